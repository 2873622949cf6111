//! Confusion counts and segmentation metrics.

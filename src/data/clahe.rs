//! Contrast-limited adaptive histogram equalisation (CLAHE) of an 8-bit plane, with the
//! semantics of OpenCV's `cv::createCLAHE(clip_limit, (tiles_x, tiles_y))->apply(src)` on
//! `CV_8UC1` images, which the retinal-vessel literature uses to even out the fundus
//! photograph's uneven illumination (`data.normalize = "clahe"`).
//!
//! 1. The plane is cut into `tiles_x × tiles_y` tiles of `w / tiles_x × h / tiles_y` pixels.
//!    When either axis does not divide, OpenCV pads *both* (the one that divides by a whole
//!    tile's worth), so tiles are `⌊w / tiles_x⌋ + 1 × ⌊h / tiles_y⌋ + 1`; the pixels past the
//!    right and bottom edges are mirrored without repeating the edge (`BORDER_REFLECT_101`),
//!    for the histograms only.
//! 2. Each tile's 256-bin histogram is clipped at `max(1, ⌊clip_limit × tile_area / 256⌋)`.
//!    The clipped excess is spread evenly over all bins (`⌊excess / 256⌋` each), and what
//!    remains one count at a time to bins `0, s, 2s, …` with `s = max(256 / residual, 1)`.
//! 3. A tile's lookup table is its cumulative histogram scaled by `255 / tile_area` (in
//!    `f32`) and rounded half to even (`cvRound`).
//! 4. Each pixel maps through the four tables whose tile centres surround it, blended
//!    bilinearly in `f32` (tables clamped at the border), and rounded half to even.
//!
//! `tests/fixtures/clahe.safetensors` (from `tools/fixtures_clahe.py`, OpenCV 5.0) holds
//! OpenCV's outputs, and the tests below match them exactly.

/// OpenCV's default clip limit for `createCLAHE`, and the one the DRIVE literature uses.
pub const CLIP_LIMIT: f32 = 2.0;
/// Tiles per axis (OpenCV's default grid, 8 × 8).
pub const TILES: usize = 8;

/// CLAHE of the row-major 8-bit plane `src` of `w × h` pixels (see the module documentation).
/// Panics if `src.len() != w * h` or a tile count is 0 (callers pass whole images and the
/// constants above).
pub fn clahe(src: &[u8], w: usize, h: usize, tiles: (usize, usize), clip_limit: f32) -> Vec<u8> {
    let (tx, ty) = tiles;
    assert!(tx > 0 && ty > 0, "CLAHE needs at least one tile per axis");
    assert_eq!(
        src.len(),
        w * h,
        "CLAHE: plane of {w}x{h} has {} bytes",
        src.len()
    );
    if w == 0 || h == 0 {
        return Vec::new();
    }
    // OpenCV pads both axes as soon as one does not divide, an axis that divides by a whole
    // extra tile's worth of pixels: the tile is then `⌊n / tiles⌋ + 1` on both axes.
    let (tw, th) = if w.is_multiple_of(tx) && h.is_multiple_of(ty) {
        (w / tx, h / ty)
    } else {
        (w / tx + 1, h / ty + 1)
    };
    let area = tw * th;
    let clip = ((clip_limit * area as f32 / 256.0) as usize).max(1);
    let luts: Vec<[u8; 256]> = (0..ty)
        .flat_map(|j| (0..tx).map(move |i| (i, j)))
        .map(|(i, j)| tile_lut(src, w, h, (i * tw, j * th), (tw, th), clip))
        .collect();

    // Bilinear blend of the four surrounding tables, as OpenCV's CLAHE_Interpolation_Body.
    let coords = |n: usize, t: usize, tiles: usize| -> Vec<(usize, usize, f32)> {
        let inv = 1.0 / t as f32;
        (0..n)
            .map(|p| {
                let f = p as f32 * inv - 0.5;
                let lo = f.floor() as isize;
                let a = f - lo as f32;
                let clamp = |v: isize| v.clamp(0, tiles as isize - 1) as usize;
                (clamp(lo), clamp(lo + 1), a)
            })
            .collect()
    };
    let xs = coords(w, tw, tx);
    let mut out = vec![0u8; w * h];
    for (y, (ty1, ty2, ya)) in coords(h, th, ty).into_iter().enumerate() {
        let (row1, row2) = (
            &luts[ty1 * tx..(ty1 + 1) * tx],
            &luts[ty2 * tx..(ty2 + 1) * tx],
        );
        for (x, &(tx1, tx2, xa)) in xs.iter().enumerate() {
            let v = src[y * w + x] as usize;
            let top = row1[tx1][v] as f32 * (1.0 - xa) + row1[tx2][v] as f32 * xa;
            let bottom = row2[tx1][v] as f32 * (1.0 - xa) + row2[tx2][v] as f32 * xa;
            out[y * w + x] = (top * (1.0 - ya) + bottom * ya)
                .round_ties_even()
                .clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Index `p` of an axis of length `n`, mirrored past the end without repeating the edge.
fn reflect101(p: usize, n: usize) -> usize {
    if p < n || n == 1 {
        p.min(n - 1)
    } else {
        (2 * (n - 1)).saturating_sub(p)
    }
}

/// The clipped, equalised lookup table of the tile at `origin` of size `size`.
fn tile_lut(
    src: &[u8],
    w: usize,
    h: usize,
    origin: (usize, usize),
    size: (usize, usize),
    clip: usize,
) -> [u8; 256] {
    let mut hist = [0usize; 256];
    for y in origin.1..origin.1 + size.1 {
        let row = reflect101(y, h) * w;
        for x in origin.0..origin.0 + size.0 {
            hist[src[row + reflect101(x, w)] as usize] += 1;
        }
    }
    let mut excess = 0;
    for c in hist.iter_mut() {
        if *c > clip {
            excess += *c - clip;
            *c = clip;
        }
    }
    let batch = excess / 256;
    let mut residual = excess - batch * 256;
    for c in hist.iter_mut() {
        *c += batch;
    }
    if let Some(step) = 256usize.checked_div(residual) {
        let step = step.max(1);
        let mut i = 0;
        while i < 256 && residual > 0 {
            hist[i] += 1;
            residual -= 1;
            i += step;
        }
    }
    let scale = 255.0 / (size.0 * size.1) as f32;
    let mut lut = [0u8; 256];
    let mut sum = 0;
    for (slot, c) in lut.iter_mut().zip(hist) {
        sum += c;
        *slot = (sum as f32 * scale).round_ties_even().min(255.0) as u8;
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// One tile and a clip limit that never clips: global histogram equalisation. The values
    /// 0, 0, 100, 200 have cumulative counts 2, 3, 4 of 4, so they map to round(255 × 2/4) =
    /// 128, round(255 × 3/4) = 191 and 255.
    #[test]
    fn one_unclipped_tile_is_histogram_equalisation() {
        let out = clahe(&[0, 0, 100, 200], 2, 2, (1, 1), 1000.0);
        assert_eq!(out, vec![128, 128, 191, 255]);
    }

    /// Clipping by hand: a 4×4 tile (area 16) with clip limit 32 clips at ⌊32 × 16 / 256⌋ = 2.
    /// Ten pixels of 50 and six of 51: excess 8 + 4 = 12, spread as ⌊12/256⌋ = 0 per bin
    /// and a residual of 12 to bins 0, 21, 42, …, 231 (step ⌊256/12⌋ = 21). So bins 0..=50
    /// hold 3 (0, 21, 42), value 50 has cumulative 3 + 2 = 5 → round(255 × 5/16) = 80, and
    /// value 51 has 7 → round(255 × 7/16) = 112.
    #[test]
    fn clipping_and_redistribution_by_hand() {
        let mut src = vec![50u8; 16];
        src[10..].fill(51);
        let out = clahe(&src, 4, 4, (1, 1), 32.0);
        assert_eq!(&out[..10], &[80; 10]);
        assert_eq!(&out[10..], &[112; 6]);
    }

    #[test]
    fn reflect101_mirrors_without_repeating_the_edge() {
        assert_eq!(
            (0..8).map(|p| reflect101(p, 5)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 3, 2, 1]
        );
        assert_eq!(reflect101(3, 1), 0);
    }

    /// OpenCV's own outputs (tools/fixtures_clahe.py): sizes that do and do not divide into
    /// the tiles, clipping strong and absent, noise and smooth gradients.
    #[test]
    fn matches_opencv_exactly() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/clahe.safetensors"
        );
        let bytes = std::fs::read(path).expect("read the CLAHE fixture");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse the CLAHE fixture");
        let meta = safetensors::SafeTensors::read_metadata(&bytes)
            .expect("fixture metadata")
            .1;
        let cases: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        assert!(cases.len() >= 4, "fixture lists {} cases", cases.len());
        for (name, params) in &cases {
            let p: Vec<f32> = params.split(',').map(|v| v.parse().unwrap()).collect();
            let (tiles, clip) = ((p[0] as usize, p[1] as usize), p[2]);
            let src = st.tensor(&format!("{name}.src")).unwrap();
            let (h, w) = (src.shape()[0], src.shape()[1]);
            let want = st.tensor(&format!("{name}.out")).unwrap();
            let got = clahe(src.data(), w, h, tiles, clip);
            let bad = got.iter().zip(want.data()).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad, 0,
                "{name} ({w}x{h}, tiles {tiles:?}, clip {clip}): {bad} pixels differ"
            );
        }
    }
}

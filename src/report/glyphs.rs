//! A plotters drawing backend that draws text itself with ab_glyph.
//!
//! plotters 0.3.7's ab_glyph text path places each glyph at the pen position without
//! its left side bearing, so letters come out unevenly spaced ("deepl ab v3").
//! [`GlyphBackend`] wraps [`BitMapBackend`], forwards every shape to it and lays text
//! out properly: pen advance + kerning, glyph bounds offset, anchor and rotation as
//! plotters defines them, anti-aliased coverage blended into the bitmap.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, ScaleFont};
use plotters::prelude::BitMapBackend;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
    FontStyle,
};

/// DejaVu Sans (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
pub(crate) static FONT_REGULAR: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));
pub(crate) static FONT_BOLD: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans-Bold.ttf"
));

struct Faces {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

/// The bundled faces, parsed once.
fn faces() -> Result<&'static Faces, String> {
    static FACES: OnceLock<Result<Faces, String>> = OnceLock::new();
    FACES
        .get_or_init(|| {
            let parse = |bytes: &'static [u8], name: &str| {
                FontRef::try_from_slice(bytes)
                    .map_err(|e| format!("the bundled {name} is not a valid font: {e}"))
            };
            Ok(Faces {
                regular: parse(FONT_REGULAR, "DejaVuSans.ttf")?,
                bold: parse(FONT_BOLD, "DejaVuSans-Bold.ttf")?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Error raised when the fonts cannot be parsed (only if the bundled files are corrupt).
#[derive(Debug)]
struct FontUnavailable(String);

impl std::fmt::Display for FontUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FontUnavailable {}

/// Glyphs of a line of text with their pen x positions, plus the line's box.
struct Line {
    glyphs: Vec<(GlyphId, f32)>,
    width: f32,
    ascent: f32,
    height: f32,
    font: &'static FontRef<'static>,
    scale: PxScale,
}

fn layout<S: BackendTextStyle, E>(text: &str, style: &S) -> Result<Line, DrawingErrorKind<E>>
where
    E: std::error::Error + Send + Sync,
{
    let faces = faces().map_err(|e| DrawingErrorKind::FontError(Box::new(FontUnavailable(e))))?;
    let font = match style.style() {
        FontStyle::Bold => &faces.bold,
        _ => &faces.regular,
    };
    let scale = PxScale::from(style.size() as f32);
    let sf = font.as_scaled(scale);
    let mut glyphs = Vec::with_capacity(text.len());
    let mut pen = 0.0f32;
    let mut prev: Option<GlyphId> = None;
    for c in text.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            pen += sf.kern(p, id);
        }
        glyphs.push((id, pen));
        pen += sf.h_advance(id);
        prev = Some(id);
    }
    Ok(Line {
        glyphs,
        width: pen,
        ascent: sf.ascent(),
        height: sf.ascent() - sf.descent(),
        font,
        scale,
    })
}

/// [`BitMapBackend`] with correct text rendering (see the module documentation).
pub(crate) struct GlyphBackend<'a> {
    inner: BitMapBackend<'a>,
}

impl<'a> GlyphBackend<'a> {
    pub fn new(inner: BitMapBackend<'a>) -> Self {
        Self { inner }
    }
}

type Err<'a> = DrawingErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>;

impl<'a> DrawingBackend for GlyphBackend<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), Err<'a>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), Err<'a>> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), Err<'a>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), Err<'a>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), Err<'a>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), Err<'a>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), Err<'a>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), Err<'a>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), Err<'a>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), Err<'a>> {
        let line = layout(text, style)?;
        Ok((line.width.ceil() as u32, line.height.ceil() as u32))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), Err<'a>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let line = layout(text, style)?;
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -line.width / 2.0,
            HPos::Right => -line.width,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -line.height / 2.0,
            VPos::Bottom => -line.height,
        };
        let transform = style.transform();
        let mut result = Ok(());
        for &(id, x) in &line.glyphs {
            let glyph =
                id.with_scale_and_position(line.scale, point(x + dx, (dy + line.ascent).round()));
            let Some(outline) = line.font.outline_glyph(glyph) else {
                continue; // whitespace
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                if coverage <= 0.0 || result.is_err() {
                    return;
                }
                let lx = bounds.min.x as i32 + gx as i32;
                let ly = bounds.min.y as i32 + gy as i32;
                let (tx, ty) = transform.transform(lx, ly);
                let c = BackendColor {
                    alpha: color.alpha * f64::from(coverage.min(1.0)),
                    rgb: color.rgb,
                };
                result = self.inner.draw_pixel((pos.0 + tx, pos.1 + ty), c);
            });
            if result.is_err() {
                break;
            }
        }
        result
    }
}

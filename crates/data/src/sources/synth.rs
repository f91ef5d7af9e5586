//! Synthetic plankton generator: a stand-in for the NDSB 2015 competition data.
//!
//! The real data set (grayscale images of single segmented organisms, 121 classes) cannot be
//! redistributed, so the demo, the tests and CI use images drawn here instead. They are meant to
//! behave like the real thing for a classifier, not to look like noise:
//!
//! - every class belongs to one of eight organism *families* (round cells, chains of cells, rods,
//!   needles, spiny forms with radial spines, copepod-like bodies with long antennae, spirals,
//!   blobs with appendages) and has its own shape parameters (cells per chain, spine count,
//!   aspect ratio, spiral turns, ...), tones and texture, so neighbouring classes of a family are
//!   confusable the way real plankton classes are;
//! - every class has its own log-normal SIZE distribution around a class median (the organism's
//!   largest extent in pixels, 20 to 390 px), because in the real data pixel size is proportional
//!   to real size and is a useful feature;
//! - each image draws a random orientation, mirror, size, shape jitter, internal texture, defocus
//!   blur and sensor noise, and shows a dark organism on a light background (about 240-253,
//!   like the NDSB images), cropped to the organism with a small margin, so image sizes run from
//!   about 30 to about 400 px per side and are not square.
//!
//! Class definitions depend only on `(class, num_classes)`; the seed only changes the samples.
//! Every image is a pure function of `(seed, class, num_classes, index)` (its random stream is
//! `Stream::new(seed, Purpose::Synth, class, index)`), so output does not depend on the number of
//! worker threads.
//!
//! Rendering: an organism is a list of *shapes*; a shape is a union of primitives (rotated
//! ellipses and tapered capsules) shaded by depth from its outline (darker membrane, lighter
//! interior) and modulated by value noise. Each primitive only touches the pixels of its bounding
//! box; drawing is done at 2x and box-filtered down for antialiasing.

use std::f32::consts::{PI, TAU};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use image::GrayImage;

use crate::table::csv_bytes;
use plankton_core::rng::{Purpose, Stream};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Number of classes (at least 1).
    pub classes: usize,
    /// Training images per class (at least 1).
    pub per_class: usize,
    /// Unlabelled test images (classes drawn uniformly); may be 0.
    pub test: usize,
    /// Seed of the samples (class definitions do not depend on it).
    pub seed: u64,
    /// Worker threads; 0 = all cores.
    pub threads: usize,
}

impl Default for SynthOptions {
    /// The competition's shape: 121 classes x 250 (about its 30k training images) + 3,000 test.
    fn default() -> Self {
        SynthOptions {
            classes: 121,
            per_class: 250,
            test: 3000,
            seed: 0,
            threads: 0,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    /// Class names in class order (which is also their sorted order).
    pub class_names: Vec<String>,
    pub train_images: usize,
    pub test_images: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synth options: {0}")]
    InvalidOptions(String),
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encoding JPEG {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Classes
// ---------------------------------------------------------------------------------------------

/// Organism families. Their names are in alphabetical order, and classes are assigned to
/// families in contiguous blocks, so `<family>_<nn>` names sort in class order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Copepod-like: segmented elongated body, tail, two long thin antennae.
    Antennae,
    /// Irregular lobed body with a few thick, curved appendages.
    Blob,
    /// A chain of cells along a gently curved path.
    Chain,
    /// Thin pointed needles, single or in small bundles.
    Needle,
    /// Rods with rounded ends, cross bands, optional bend.
    Rod,
    /// Round/oval cells with a membrane, nucleus and granular texture.
    RoundCell,
    /// A body with many thin radial spines.
    Spiny,
    /// Planar spirals and coils of a filament.
    Spiral,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Antennae,
        Family::Blob,
        Family::Chain,
        Family::Needle,
        Family::Rod,
        Family::RoundCell,
        Family::Spiny,
        Family::Spiral,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Antennae => "antennae",
            Family::Blob => "blob",
            Family::Chain => "chain",
            Family::Needle => "needle",
            Family::Rod => "rod",
            Family::RoundCell => "round_cell",
            Family::Spiny => "spiny",
            Family::Spiral => "spiral",
        }
    }

    /// Range of class median sizes (largest organism extent, px) in this family.
    fn size_range(self) -> (f32, f32) {
        match self {
            Family::Antennae => (90.0, 300.0),
            Family::Blob => (40.0, 200.0),
            Family::Chain => (45.0, 280.0),
            Family::Needle => (60.0, 330.0),
            Family::Rod => (26.0, 170.0),
            Family::RoundCell => (22.0, 190.0),
            Family::Spiny => (55.0, 290.0),
            Family::Spiral => (40.0, 220.0),
        }
    }
}

/// The family of `class`, its rank within the family and the family's number of classes.
/// Family `f` owns classes `[f*n/8, (f+1)*n/8)`. Panics if `class >= num_classes`.
pub fn class_family(class: usize, num_classes: usize) -> (Family, usize, usize) {
    assert!(
        class < num_classes,
        "class {class} out of range for {num_classes} classes"
    );
    let nf = Family::ALL.len();
    for (f, &family) in Family::ALL.iter().enumerate() {
        let lo = f * num_classes / nf;
        let hi = (f + 1) * num_classes / nf;
        if class < hi {
            return (family, class - lo, hi - lo);
        }
    }
    unreachable!()
}

/// The name of `class`, e.g. `chain_07`: family name + 1-based number, zero-padded so that
/// names sort in class order.
pub fn class_name(class: usize, num_classes: usize) -> String {
    let (family, k, kk) = class_family(class, num_classes);
    let width = kk.to_string().len().max(2);
    format!("{}_{:0width$}", family.name(), k + 1)
}

/// All class names in class order (= sorted order).
pub fn class_names(num_classes: usize) -> Vec<String> {
    (0..num_classes)
        .map(|c| class_name(c, num_classes))
        .collect()
}

/// Seed of the class definitions (fixed: classes are the same for every sample seed).
const CLASS_SEED: u64 = 0x0C1A_55DE_F5EE_D001;

/// Class-specific parameters.
#[derive(Debug, Clone)]
struct ClassDef {
    family: Family,
    /// Position on the family's main shape axis, in [0, 1] (spread evenly over the family).
    t: f32,
    /// Further class-specific shape parameters, each in [0, 1).
    u: [f32; 6],
    /// Median largest extent of the organism, px.
    median: f32,
    /// Log-normal sigma of the size.
    sigma: f32,
    fill: f32,
    rim: f32,
    /// Membrane width as a fraction of the organism size.
    rim_frac: f32,
    tex_amp: f32,
    tex_scale: f32,
    /// Typical defocus blur sigma, px.
    blur: f32,
}

fn class_def(class: usize, num_classes: usize) -> ClassDef {
    let (family, k, kk) = class_family(class, num_classes);
    let fam = family as u64;
    let mut r = Stream::new(
        CLASS_SEED,
        Purpose::Synth,
        fam,
        ((kk as u64) << 32) | k as u64,
    );
    let t = if kk == 1 {
        r.next_f64() as f32
    } else {
        k as f32 / (kk - 1) as f32
    };
    // Size levels: a fixed permutation within the family, so that classes adjacent on the main
    // shape axis usually differ in size and classes of similar size differ in shape.
    let mut order: Vec<usize> = (0..kk).collect();
    Stream::new(CLASS_SEED, Purpose::Synth, 100 + fam, kk as u64).shuffle(&mut order);
    let level = if kk == 1 {
        r.next_f64() as f32
    } else {
        ((order[k] as f32 + r.uniform(-0.3, 0.3) as f32) / (kk - 1) as f32).clamp(0.0, 1.0)
    };
    let (lo, hi) = family.size_range();
    // (skewed towards small classes, as in the real data where most organisms are small)
    let mut median = lo * (hi / lo).powf(level.powf(1.3));
    let mut u = [0f32; 6];
    for x in &mut u {
        *x = r.next_f64() as f32;
    }
    if family == Family::Chain {
        // keep cells at least ~6 px long
        let n0 = 2.0 + (t * 12.0).round();
        median = median.max(6.5 * n0);
    }
    let fill = r.uniform(0.12, 0.4) as f32;
    let rim = r.uniform((fill + 0.2) as f64, (fill + 0.5).min(0.9) as f64) as f32;
    ClassDef {
        family,
        t,
        u,
        median,
        sigma: r.uniform(0.12, 0.22) as f32,
        fill,
        rim,
        rim_frac: r.uniform(0.02, 0.07) as f32,
        tex_amp: r.uniform(0.08, 0.45) as f32,
        tex_scale: r.log_uniform(1.3, 6.0) as f32,
        blur: r.log_uniform(0.35, 0.85) as f32,
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

type V2 = [f32; 2];

#[inline]
fn dir(a: f32) -> V2 {
    [a.cos(), a.sin()]
}
#[inline]
fn add(a: V2, b: V2) -> V2 {
    [a[0] + b[0], a[1] + b[1]]
}
#[inline]
fn mul(a: V2, s: f32) -> V2 {
    [a[0] * s, a[1] * s]
}
#[inline]
fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}
/// Log-linear interpolation (for ratios).
#[inline]
fn lerp_log(a: f32, b: f32, t: f32) -> f32 {
    (a.ln() + (b.ln() - a.ln()) * t).exp()
}

#[derive(Debug, Clone, Copy)]
enum Prim {
    /// Ellipse centred at `c` with semi-axes `r`, its first axis at angle `ang`.
    Ellipse { c: V2, r: V2, ang: f32 },
    /// Segment `a`-`b` with radius linearly tapering from `ra` to `rb`.
    Capsule { a: V2, b: V2, ra: f32, rb: f32 },
}

impl Prim {
    fn ellipse(c: V2, rx: f32, ry: f32, ang: f32) -> Prim {
        Prim::Ellipse {
            c,
            r: [rx.max(0.3), ry.max(0.3)],
            ang,
        }
    }

    fn capsule(a: V2, b: V2, ra: f32, rb: f32) -> Prim {
        Prim::Capsule {
            a,
            b,
            ra: ra.max(0.3),
            rb: rb.max(0.3),
        }
    }

    /// Axis-aligned bounds (x0, y0, x1, y1).
    fn bounds(&self) -> [f32; 4] {
        match *self {
            Prim::Ellipse { c, r, ang } => {
                let (s, co) = ang.sin_cos();
                let hx = ((r[0] * co).powi(2) + (r[1] * s).powi(2)).sqrt();
                let hy = ((r[0] * s).powi(2) + (r[1] * co).powi(2)).sqrt();
                [c[0] - hx, c[1] - hy, c[0] + hx, c[1] + hy]
            }
            Prim::Capsule { a, b, ra, rb } => {
                let m = ra.max(rb);
                [
                    a[0].min(b[0]) - m,
                    a[1].min(b[1]) - m,
                    a[0].max(b[0]) + m,
                    a[1].max(b[1]) + m,
                ]
            }
        }
    }

    /// Similarity transform: p -> s * R(theta) * M * p + t, where M mirrors y when `mirror`.
    fn transform(&mut self, cs: V2, mirror: bool, s: f32, t: V2) {
        let tp = |p: V2| -> V2 {
            let y = if mirror { -p[1] } else { p[1] };
            [
                s * (cs[0] * p[0] - cs[1] * y) + t[0],
                s * (cs[1] * p[0] + cs[0] * y) + t[1],
            ]
        };
        let theta = cs[1].atan2(cs[0]);
        match self {
            Prim::Ellipse { c, r, ang } => {
                *c = tp(*c);
                r[0] = (r[0] * s).max(0.3);
                r[1] = (r[1] * s).max(0.3);
                *ang = theta + if mirror { -*ang } else { *ang };
            }
            Prim::Capsule { a, b, ra, rb } => {
                *a = tp(*a);
                *b = tp(*b);
                *ra = (*ra * s).max(0.3);
                *rb = (*rb * s).max(0.3);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Style {
    /// Darkness of the interior (0 = background, 1 = black).
    fill: f32,
    /// Darkness at the outline.
    rim: f32,
    /// Width of the darker membrane, px.
    rim_w: f32,
    /// Relative amplitude of the internal texture.
    tex_amp: f32,
    /// Grain size of the texture, px.
    tex_scale: f32,
}

impl Style {
    fn darker(self, d: f32) -> Style {
        Style {
            fill: (self.fill + d).min(0.95),
            rim: (self.rim + d * 0.5).min(0.95),
            ..self
        }
    }
    fn solid(dark: f32, tex_amp: f32, tex_scale: f32) -> Style {
        Style {
            fill: dark,
            rim: dark,
            rim_w: 1.0,
            tex_amp,
            tex_scale,
        }
    }
}

/// A union of primitives shaded as one body.
#[derive(Debug, Clone)]
struct Shape {
    prims: Vec<Prim>,
    style: Style,
    /// Texture key.
    key: u32,
}

impl Shape {
    fn bounds(&self) -> [f32; 4] {
        let mut b = [
            f32::INFINITY,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        for p in &self.prims {
            let q = p.bounds();
            b = [
                b[0].min(q[0]),
                b[1].min(q[1]),
                b[2].max(q[2]),
                b[3].max(q[3]),
            ];
        }
        b
    }
}

fn bounds_of(shapes: &[Shape]) -> [f32; 4] {
    let mut b = [
        f32::INFINITY,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
    ];
    for s in shapes {
        let q = s.bounds();
        b = [
            b[0].min(q[0]),
            b[1].min(q[1]),
            b[2].max(q[2]),
            b[3].max(q[3]),
        ];
    }
    b
}

fn transform_all(shapes: &mut [Shape], theta: f32, mirror: bool, s: f32, t: V2) {
    let cs = dir(theta);
    for sh in shapes {
        for p in &mut sh.prims {
            p.transform(cs, mirror, s, t);
        }
        sh.style.rim_w = (sh.style.rim_w * s).max(0.5);
    }
}

/// Capsules along a polyline (one shape's worth of primitives).
fn polyline(points: &[V2], radii: &[f32]) -> Vec<Prim> {
    points
        .windows(2)
        .zip(radii.windows(2))
        .map(|(p, r)| Prim::capsule(p[0], p[1], r[0], r[1]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Organism builders (local frame: main axis along x, size ~ `l` px)
// ---------------------------------------------------------------------------------------------

struct Builder<'a> {
    def: &'a ClassDef,
    r: &'a mut Stream,
    l: f32,
    base: Style,
    shapes: Vec<Shape>,
}

impl<'a> Builder<'a> {
    fn new(def: &'a ClassDef, r: &'a mut Stream, l: f32) -> Self {
        let dark = r.uniform(0.85, 1.12) as f32;
        let fill = (def.fill * dark * jit(r, 0.08)).clamp(0.05, 0.9);
        let rim = (def.rim * dark * jit(r, 0.06)).clamp(fill, 0.95);
        let base = Style {
            fill,
            rim,
            rim_w: (def.rim_frac * l * jit(r, 0.15)).max(0.8),
            tex_amp: def.tex_amp * jit(r, 0.15),
            tex_scale: def.tex_scale * jit(r, 0.1),
        };
        Builder {
            def,
            r,
            l,
            base,
            shapes: Vec::new(),
        }
    }

    fn push(&mut self, prims: Vec<Prim>, style: Style) {
        if prims.is_empty() {
            return;
        }
        let key = self.r.next_u64() as u32;
        self.shapes.push(Shape { prims, style, key });
    }

    fn u(&mut self, lo: f64, hi: f64) -> f32 {
        self.r.uniform(lo, hi) as f32
    }
    fn n(&mut self) -> f32 {
        self.r.normal() as f32
    }
    fn jit(&mut self, rel: f32) -> f32 {
        jit(self.r, rel)
    }
    fn sign(&mut self) -> f32 {
        if self.r.bernoulli(0.5) {
            1.0
        } else {
            -1.0
        }
    }
}

/// Multiplicative jitter exp(rel * N(0, 1)).
fn jit(r: &mut Stream, rel: f32) -> f32 {
    (rel * r.normal() as f32).exp()
}

fn build_round_cell(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let aspect = lerp(1.0, 1.45, u[0]) * b.jit(0.05);
    let variant = (u[1] * 4.0) as usize; // 0 plain, 1 halo, 2 granular, 3 dividing
    let rx = l / 2.0;
    let ry = rx / aspect.max(1.0);
    let st = b.base;
    if variant == 1 {
        let k = 1.12 + 0.18 * u[3];
        let halo = Style {
            fill: st.fill * 0.25,
            rim: st.rim * 0.55,
            rim_w: st.rim_w * 0.7,
            tex_amp: st.tex_amp * 0.5,
            ..st
        };
        b.push(vec![Prim::ellipse([0.0, 0.0], rx * k, ry * k, 0.0)], halo);
    }
    let mut body = Vec::new();
    let off = rx * lerp(0.35, 0.5, u[4]);
    if variant == 3 {
        body.push(Prim::ellipse([-off, 0.0], rx - off * 0.9, ry * 0.95, 0.0));
        body.push(Prim::ellipse([off, 0.0], rx - off * 0.9, ry * 0.95, 0.0));
    } else {
        body.push(Prim::ellipse([0.0, 0.0], rx, ry, 0.0));
        // lumps make the outline slightly irregular
        for _ in 0..b.r.below(3) {
            let a = b.u(0.0, TAU as f64);
            let c = mul(dir(a), 0.08 * rx);
            body.push(Prim::ellipse(
                [c[0], c[1] * ry / rx],
                rx * 0.92,
                ry * 0.92,
                0.0,
            ));
        }
    }
    b.push(body, st);
    let nuc = Style {
        rim_w: st.rim_w * 0.6,
        ..st.darker(0.2 + 0.25 * u[5])
    };
    let nr = lerp(0.15, 0.5, t) * ry * b.jit(0.1);
    if variant == 3 {
        let c1 = [-off + b.n() * 0.05 * rx, b.n() * 0.05 * ry];
        let c2 = [off + b.n() * 0.05 * rx, b.n() * 0.05 * ry];
        let a = b.u(0.0, PI as f64);
        b.push(vec![Prim::ellipse(c1, nr, nr * 0.85, a)], nuc);
        let a = b.u(0.0, PI as f64);
        b.push(vec![Prim::ellipse(c2, nr, nr * 0.85, a)], nuc);
    } else {
        let a = b.u(0.0, TAU as f64);
        let d = b.u(0.0, 0.5) * (ry - nr).max(0.0);
        let c = mul(dir(a), d);
        let ang = b.u(0.0, PI as f64);
        let asp = b.u(0.75, 1.0);
        b.push(vec![Prim::ellipse(c, nr, nr * asp, ang)], nuc);
    }
    if variant == 2 {
        let count = 5 + b.r.below(12) as usize;
        let gr = Style::solid((st.rim + 0.1).min(0.95), 0.0, 1.0);
        let mut prims = Vec::new();
        for _ in 0..count {
            let a = b.u(0.0, TAU as f64);
            let d = b.u(0.0, 0.8).sqrt();
            let g = b.u(0.04, 0.09) * rx;
            prims.push(Prim::ellipse(
                [a.cos() * d * (rx - g), a.sin() * d * (ry - g)],
                g,
                g,
                0.0,
            ));
        }
        b.push(prims, gr);
    }
}

fn build_chain(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let n0 = 2.0 + (t * 12.0).round();
    let n = (n0 + (0.6 * b.n()).round()).clamp(2.0, 16.0) as usize;
    let aspect = lerp_log(0.55, 1.5, u[0]) * b.jit(0.06);
    let gap = lerp(-0.15, 0.35, u[1]) + 0.03 * b.n();
    let turn = lerp(0.0, 1.6, u[2] * u[2]) * b.jit(0.3) * b.sign() + 0.1 * b.n();
    let cl = l / (n as f32 + (n - 1) as f32 * gap);
    let cw = cl / aspect;
    let step = cl * (1.0 + gap);
    let dh = turn / (n - 1).max(1) as f32;
    let h0 = -turn / 2.0;
    let mut centers = vec![[0.0f32, 0.0f32]];
    let mut headings = vec![h0];
    let mut pos = [0.0f32, 0.0];
    for i in 1..n {
        let hm = h0 + (i as f32 - 0.5) * dh;
        pos = add(pos, mul(dir(hm), step));
        centers.push(pos);
        headings.push(h0 + i as f32 * dh);
    }
    let st = b.base;
    if gap > 0.08 {
        let lr = (0.07 * cw).max(0.5);
        let radii = vec![lr; n];
        b.push(polyline(&centers, &radii), st.darker(0.1));
    }
    let nuclei = u[3] > 0.5;
    for i in 0..n {
        let sx = cl / 2.0 * b.jit(0.06);
        let sy = cw / 2.0 * b.jit(0.06);
        let a = headings[i] + 0.08 * b.n();
        b.push(vec![Prim::ellipse(centers[i], sx, sy, a)], st);
        if nuclei {
            let nr = 0.3 * sx.min(sy);
            let c = add(centers[i], [b.n() * 0.1 * sx, b.n() * 0.1 * sy]);
            b.push(vec![Prim::ellipse(c, nr, nr * 0.8, a)], st.darker(0.3));
        }
    }
}

fn build_rod(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let aspect = lerp_log(1.8, 7.0, t) * b.jit(0.08);
    let w = l / aspect;
    let half = l / 2.0;
    let bend = lerp(0.0, 0.3, u[1]) * b.jit(0.3);
    let mut bands = (u[0] * 6.0) as usize;
    if bands > 0 && b.r.bernoulli(0.2) {
        bands = (bands as i64 + if b.r.bernoulli(0.5) { 1 } else { -1 }) as usize;
    }
    let st = b.base;
    let sag = bend * l * 0.3;
    let arc = |x: f32| sag * (1.0 - (x / half).powi(2));
    if u[2] < 0.35 && bend < 0.08 {
        b.push(vec![Prim::ellipse([0.0, 0.0], half, w / 2.0, 0.0)], st);
    } else {
        let m = 6;
        let x0 = -half + w / 2.0;
        let x1 = half - w / 2.0;
        let pts: Vec<V2> = (0..=m)
            .map(|i| {
                let x = lerp(x0, x1, i as f32 / m as f32);
                [x, arc(x)]
            })
            .collect();
        b.push(polyline(&pts, &vec![w / 2.0; m + 1]), st);
    }
    if bands > 0 {
        let mut prims = Vec::new();
        let bw = (0.018 * l).max(0.6);
        for j in 0..bands {
            let x = -half + l * (j as f32 + 1.0) / (bands as f32 + 1.0) + b.n() * 0.02 * l;
            let y = arc(x);
            let fall = (1.0 - (x / half).powi(2)).max(0.0).sqrt();
            prims.push(Prim::ellipse(
                [x, y],
                bw,
                w / 2.0 * 0.85 * fall.max(0.3),
                0.0,
            ));
        }
        b.push(
            prims,
            Style {
                rim_w: bw,
                ..st.darker(0.25)
            },
        );
    }
    if u[3] > 0.7 {
        let pr = w * 0.28;
        let xs = half - w * 0.45;
        let prims = vec![
            Prim::ellipse([-xs, arc(-xs)], pr, pr, 0.0),
            Prim::ellipse([xs, arc(xs)], pr, pr, 0.0),
        ];
        b.push(prims, st.darker(0.35));
    }
}

fn build_needle(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let aspect = lerp_log(10.0, 45.0, t) * b.jit(0.1);
    let count = if u[0] < 0.5 {
        1
    } else if u[0] < 0.8 {
        2
    } else {
        3 + b.r.below(2) as usize
    };
    let spread = lerp(0.03, 0.5, u[1]);
    let curv = lerp(0.0, 0.12, u[2]);
    let w = (l / aspect).max(1.0);
    let mut prims = Vec::new();
    for k in 0..count {
        let len = if k == 0 { l } else { l * b.u(0.7, 1.0) };
        let ang = if k == 0 { 0.0 } else { b.n() * spread / 2.0 };
        let off = if k == 0 {
            [0.0, 0.0]
        } else {
            [b.n() * 0.06 * l, b.n() * w]
        };
        let c = curv * b.jit(0.3) * b.sign() * len;
        let wk = w * b.jit(0.1);
        let m = 8;
        let mut pts = Vec::new();
        let mut radii = Vec::new();
        let rot = dir(ang);
        for i in 0..=m {
            let s = i as f32 / m as f32 * 2.0 - 1.0; // -1..1
            let p = [s * len / 2.0, c * (1.0 - s * s)];
            pts.push(add(
                off,
                [rot[0] * p[0] - rot[1] * p[1], rot[1] * p[0] + rot[0] * p[1]],
            ));
            radii.push(0.35 + (wk / 2.0 - 0.35).max(0.0) * (1.0 - s * s).sqrt());
        }
        prims.extend(polyline(&pts, &radii));
    }
    let st = Style {
        fill: b.base.rim * 0.9,
        rim_w: 0.8,
        ..b.base
    };
    b.push(prims, st);
    if u[3] > 0.6 {
        let st = b.base.darker(0.2);
        b.push(vec![Prim::ellipse([0.0, 0.0], w * 1.3, w * 0.8, 0.0)], st);
    }
}

fn build_spiny(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let ns = ((4.0 + t * 26.0) + b.n()).round().max(3.0) as usize;
    let big_r = l / 2.0;
    let body = lerp(0.12, 0.4, u[0]) * big_r * b.jit(0.08);
    let thick = (lerp(0.006, 0.02, u[1]) * l).max(0.45);
    let irregular = lerp(0.0, 0.35, u[2]);
    let curv = lerp(0.0, 0.3, u[3]) * b.sign();
    let aspect = lerp(1.0, 1.5, u[4]);
    let phase = b.u(0.0, TAU as f64);
    let spine_len = big_r - body * 0.5;
    let mut prims = Vec::new();
    for i in 0..ns {
        let a = phase + TAU * i as f32 / ns as f32 + b.n() * 0.12 * TAU / ns as f32;
        let len = spine_len * (1.0 - irregular * b.u(0.0, 1.0));
        let start = mul(dir(a), body * 0.5);
        let c = curv * b.jit(0.2);
        let mid = add(start, mul(dir(a + c * 0.5), len / 2.0));
        let end = add(mid, mul(dir(a + c), len / 2.0));
        prims.extend(polyline(&[start, mid, end], &[thick, thick * 0.65, 0.3]));
    }
    let st = b.base;
    b.push(
        prims,
        Style {
            fill: st.rim,
            rim_w: 0.8,
            tex_amp: 0.0,
            ..st
        },
    );
    let ang = b.u(0.0, PI as f64);
    b.push(
        vec![Prim::ellipse([0.0, 0.0], body, body / aspect, ang)],
        st,
    );
    let nr = body * lerp(0.3, 0.6, u[5]);
    b.push(
        vec![Prim::ellipse([0.0, 0.0], nr, nr / aspect, ang)],
        st.darker(0.25),
    );
}

fn build_antennae(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let aspect = lerp(1.8, 3.5, u[0]) * b.jit(0.06);
    let pl = l * 0.5;
    let pw = pl / aspect;
    let st = b.base;
    let mut body = vec![
        Prim::ellipse([0.0, 0.0], pl / 2.0, pw / 2.0, 0.0),
        Prim::ellipse([pl * 0.28, 0.0], pl * 0.24, pw * 0.47, 0.0),
    ];
    let nseg = 1 + (u[2] * 5.0) as usize;
    let tl = lerp(0.3, 0.9, u[4]) * pl * b.jit(0.08);
    let sl = tl / nseg as f32;
    let tail_bend = b.n() * 0.15;
    let mut x = -pl / 2.0 + sl * 0.3;
    let mut tail_end = [x, 0.0];
    for j in 0..nseg {
        let cx = x - sl * 0.5;
        let cy = tail_bend * (cx + pl / 2.0).abs();
        let rr = pw * 0.22 * (1.0 - 0.4 * j as f32 / nseg as f32);
        // the tail line falls at angle -tail_bend (x decreases while y grows)
        body.push(Prim::ellipse([cx, cy], sl * 0.6, rr, -tail_bend));
        x -= sl * 0.95;
        tail_end = [cx - sl * 0.55, cy];
    }
    b.push(body, st);
    // thin appendages: antennae, caudal setae, legs
    let ar = (0.006 * l).max(0.45);
    let mut thin = Vec::new();
    let al = lerp(0.35, 1.1, t) * pl * b.jit(0.08);
    let phi = lerp(0.5, 1.9, u[1]);
    for side in [-1.0f32, 1.0] {
        let base = [pl * 0.42, side * pw * 0.18];
        let mut h = side * (phi + 0.1 * b.n());
        let bendr = side * b.u(0.1, 0.5);
        let m = 6;
        let mut pts = vec![base];
        let mut p = base;
        for _ in 0..m {
            p = add(p, mul(dir(h), al / m as f32));
            pts.push(p);
            h += bendr / m as f32;
        }
        let radii: Vec<f32> = (0..=m)
            .map(|i| lerp(ar * 1.3, 0.3, i as f32 / m as f32))
            .collect();
        thin.extend(polyline(&pts, &radii));
        let sa = PI + side * b.u(0.1, 0.4);
        let setae_end = add(tail_end, mul(dir(sa), 0.18 * pl * b.jit(0.15)));
        thin.push(Prim::capsule(tail_end, setae_end, ar, 0.3));
    }
    let legs = (u[3] * 6.0) as usize;
    for j in 0..legs {
        let x = pl * (0.25 - 0.5 * (j as f32 + 0.5) / legs.max(1) as f32);
        for side in [-1.0f32, 1.0] {
            let a = [x, side * pw * 0.3];
            let e = add(
                a,
                mul(dir(side * (PI / 2.0 + 0.5) + 0.15 * b.n()), pw * 0.45),
            );
            thin.push(Prim::capsule(a, e, ar * 1.2, 0.35));
        }
    }
    b.push(
        thin,
        Style {
            fill: st.rim,
            rim_w: 0.8,
            tex_amp: 0.0,
            ..st
        },
    );
    // eye spot
    let er = (pw * 0.08).max(0.6);
    b.push(
        vec![Prim::ellipse([pl * 0.4, 0.0], er, er, 0.0)],
        Style::solid(0.85, 0.0, 1.0),
    );
}

fn build_blob(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let big_r = l * 0.3;
    let lobes = 1 + (u[0] * 5.0) as usize;
    let irr = lerp(0.3, 0.7, u[3]);
    let mut prims = vec![Prim::ellipse(
        [0.0, 0.0],
        big_r * b.u(0.8, 1.0),
        big_r * b.u(0.6, 0.9),
        b.u(0.0, PI as f64),
    )];
    for _ in 1..lobes {
        let c = mul(dir(b.u(0.0, TAU as f64)), big_r * irr * b.u(0.5, 1.0));
        let (rx, ry) = (big_r * b.u(0.4, 0.7), big_r * b.u(0.35, 0.6));
        prims.push(Prim::ellipse(c, rx, ry, b.u(0.0, PI as f64)));
    }
    let na = ((1.0 + t * 8.0) + 0.7 * b.n()).round().max(1.0) as usize;
    let la0 = lerp(0.4, 1.3, u[1]) * big_r;
    let base_r = lerp(0.05, 0.14, u[2]) * big_r;
    let phase = b.u(0.0, TAU as f64);
    for i in 0..na {
        let a = phase + TAU * i as f32 / na as f32 + b.n() * 0.3;
        let la = la0 * b.jit(0.2);
        let mut p = mul(dir(a), big_r * 0.6);
        let mut h = a + b.n() * 0.3;
        let dh = b.n() * 0.5 / 3.0;
        let mut pts = vec![p];
        for _ in 0..3 {
            p = add(p, mul(dir(h), la / 3.0));
            pts.push(p);
            h += dh;
        }
        let tip = (base_r * 0.3).max(0.35);
        prims.extend(polyline(&pts, &[base_r, base_r * 0.8, base_r * 0.55, tip]));
    }
    let st = Style {
        tex_amp: (b.base.tex_amp * 1.4).min(0.6),
        ..b.base
    };
    b.push(prims, st);
    let inc = 2 + b.r.below(4) as usize;
    let mut dots = Vec::new();
    for _ in 0..inc {
        let c = mul(dir(b.u(0.0, TAU as f64)), big_r * b.u(0.0, 0.5));
        let rr = big_r * b.u(0.06, 0.15);
        dots.push(Prim::ellipse(
            c,
            rr,
            rr * b.u(0.6, 1.0),
            b.u(0.0, PI as f64),
        ));
    }
    b.push(dots, st.darker(0.3));
}

fn build_spiral(b: &mut Builder) {
    let (t, u) = (b.def.t, b.def.u);
    let l = b.l;
    let turns = lerp(0.75, 4.5, t) * b.jit(0.08);
    let mut th = (lerp(0.012, 0.04, u[1]) * l).max(0.6);
    let beaded = u[2] > 0.6;
    let mut pts: Vec<V2> = Vec::new();
    let mut radii: Vec<f32> = Vec::new();
    if u[0] < 0.55 {
        // planar (Archimedean) spiral
        let big_r = l / 2.0;
        let r0 = lerp(0.0, 0.25, u[3]) * big_r;
        let spacing = (big_r - r0) / turns;
        th = th.min(spacing * 0.35).max(0.5);
        let tmax = TAU * turns;
        let mut a = 0.0f32;
        while a <= tmax {
            let rr = r0 + (big_r - r0) * a / tmax;
            pts.push(mul(dir(a), rr));
            radii.push(th * lerp(0.6, 1.0, a / tmax));
            let ds = (2.0 * th).max(2.0);
            a += (ds / rr.max(1.0)).min(0.3);
        }
    } else {
        // coil seen from the side
        let amp = lerp(0.12, 0.3, u[4]) * l * b.jit(0.1);
        let m = ((l / 2.0) as usize).max(16);
        for i in 0..=m {
            let s = i as f32 / m as f32;
            let x = (s - 0.5) * l;
            let y = amp * (TAU * turns * s).sin() * (1.0 - 0.3 * s);
            pts.push([x, y]);
            radii.push(th);
        }
    }
    // shape jitter: a gentle random bend of the whole filament
    let bend = b.n() * 0.002;
    for p in &mut pts {
        p[1] += bend * p[0] * p[0];
    }
    let st = b.base;
    if beaded {
        let mut acc = f32::INFINITY;
        let gap = 2.2 * th;
        for w in pts.windows(2) {
            let seg = ((w[1][0] - w[0][0]).powi(2) + (w[1][1] - w[0][1]).powi(2)).sqrt();
            acc += seg;
            if acc >= gap {
                acc = 0.0;
                let a = (w[1][1] - w[0][1]).atan2(w[1][0] - w[0][0]);
                let prim = Prim::ellipse(w[1], th * 1.3, th * 1.15, a);
                b.push(
                    vec![prim],
                    Style {
                        rim_w: (th * 0.4).max(0.5),
                        ..st
                    },
                );
            }
        }
    } else {
        b.push(
            polyline(&pts, &radii),
            Style {
                fill: (st.fill + st.rim) / 2.0,
                ..st
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rasterisation
// ---------------------------------------------------------------------------------------------

/// Supersampling factor.
const SS: usize = 2;
/// Width of the antialiased edge, px.
const SOFT: f32 = 0.7;
/// Limits of the largest organism extent, px.
const MIN_EXTENT: f32 = 20.0;
const MAX_EXTENT: f32 = 390.0;
/// Smallest image side, px.
const MIN_SIDE: usize = 16;

#[inline]
fn lattice(ix: i32, iy: i32, key: u32) -> f32 {
    let mut h = (ix as u32).wrapping_mul(0x9E37_79B1) ^ (iy as u32).wrapping_mul(0x85EB_CA77) ^ key;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    (h >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0
}

#[inline]
fn value_noise(x: f32, y: f32, key: u32) -> f32 {
    let fx = x.floor();
    let fy = y.floor();
    let (ix, iy) = (fx as i32, fy as i32);
    let (tx, ty) = (x - fx, y - fy);
    let sx = tx * tx * (3.0 - 2.0 * tx);
    let sy = ty * ty * (3.0 - 2.0 * ty);
    let a = lattice(ix, iy, key);
    let b = lattice(ix + 1, iy, key);
    let c = lattice(ix, iy + 1, key);
    let d = lattice(ix + 1, iy + 1, key);
    lerp(lerp(a, b, sx), lerp(c, d, sx), sy)
}

/// Two octaves of value noise, roughly in [-1, 1].
#[inline]
fn fbm(x: f32, y: f32, key: u32) -> f32 {
    0.65 * value_noise(x, y, key)
        + 0.35 * value_noise(2.03 * x + 17.1, 2.03 * y - 5.3, key ^ 0x5BD1_E995)
}

/// Pieces of a capsule no longer than `max_len` (the union is the same capsule, and small
/// pieces keep the per-primitive bounding boxes tight for long diagonal spines).
fn split_capsule(a: V2, b: V2, ra: f32, rb: f32, out: &mut Vec<(V2, V2, f32, f32)>) {
    let len = ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2)).sqrt();
    let max_len = (4.0 * ra.max(rb)).max(8.0);
    let n = ((len / max_len).ceil() as usize).max(1);
    for i in 0..n {
        let t0 = i as f32 / n as f32;
        let t1 = (i + 1) as f32 / n as f32;
        let p0 = [lerp(a[0], b[0], t0), lerp(a[1], b[1], t0)];
        let p1 = [lerp(a[0], b[0], t1), lerp(a[1], b[1], t1)];
        out.push((p0, p1, lerp(ra, rb, t0), lerp(ra, rb, t1)));
    }
}

/// Pixel index range [lo, hi) of the supersampled grid covering [x0, x1] in px.
#[inline]
fn span(x0: f32, x1: f32, n: usize) -> (usize, usize) {
    let lo = ((x0 * SS as f32 - 0.5).floor().max(0.0)) as usize;
    let hi = ((x1 * SS as f32 + 0.5).ceil().max(0.0) as usize).min(n);
    (lo.min(n), hi)
}

/// Draws `shape` into the supersampled darkness buffer `dark` (`w` x `h`), max-compositing.
fn draw_shape(shape: &Shape, dark: &mut [f32], w: usize, h: usize, sdf: &mut Vec<f32>) {
    let bb = shape.bounds();
    let (bx0, bx1) = span(bb[0] - SOFT, bb[2] + SOFT, w);
    let (by0, by1) = span(bb[1] - SOFT, bb[3] + SOFT, h);
    if bx0 >= bx1 || by0 >= by1 {
        return;
    }
    let bw = bx1 - bx0;
    sdf.clear();
    sdf.resize(bw * (by1 - by0), f32::INFINITY);
    let inv = 1.0 / SS as f32;
    let mut pieces = Vec::new();
    for prim in &shape.prims {
        let pb = prim.bounds();
        match *prim {
            Prim::Ellipse { c, r, ang } => {
                let (x0, x1) = span(pb[0] - SOFT, pb[2] + SOFT, bx1);
                let (y0, y1) = span(pb[1] - SOFT, pb[3] + SOFT, by1);
                let (s, co) = ang.sin_cos();
                let (irx, iry) = (1.0 / r[0], 1.0 / r[1]);
                let (irx2, iry2) = (irx * irx, iry * iry);
                let rmin = r[0].min(r[1]);
                for y in y0.max(by0)..y1 {
                    let dy = (y as f32 + 0.5) * inv - c[1];
                    let row = &mut sdf[(y - by0) * bw..(y - by0 + 1) * bw];
                    for x in x0.max(bx0)..x1 {
                        let dx = (x as f32 + 0.5) * inv - c[0];
                        let qx = dx * co + dy * s;
                        let qy = -dx * s + dy * co;
                        let k0 = ((qx * irx).powi(2) + (qy * iry).powi(2)).sqrt();
                        let k1 = ((qx * irx2).powi(2) + (qy * iry2).powi(2)).sqrt();
                        let d = if k1 < 1e-12 {
                            -rmin
                        } else {
                            k0 * (k0 - 1.0) / k1
                        };
                        let cell = &mut row[x - bx0];
                        if d < *cell {
                            *cell = d;
                        }
                    }
                }
            }
            Prim::Capsule { a, b, ra, rb } => {
                pieces.clear();
                split_capsule(a, b, ra, rb, &mut pieces);
                for &(a, b, ra, rb) in &pieces {
                    let m = ra.max(rb);
                    let (x0, x1) = span(a[0].min(b[0]) - m - SOFT, a[0].max(b[0]) + m + SOFT, bx1);
                    let (y0, y1) = span(a[1].min(b[1]) - m - SOFT, a[1].max(b[1]) + m + SOFT, by1);
                    let ba = [b[0] - a[0], b[1] - a[1]];
                    let bb2 = ba[0] * ba[0] + ba[1] * ba[1];
                    let ibb = if bb2 > 1e-12 { 1.0 / bb2 } else { 0.0 };
                    for y in y0.max(by0)..y1 {
                        let py = (y as f32 + 0.5) * inv - a[1];
                        let row = &mut sdf[(y - by0) * bw..(y - by0 + 1) * bw];
                        for x in x0.max(bx0)..x1 {
                            let px = (x as f32 + 0.5) * inv - a[0];
                            let t = ((px * ba[0] + py * ba[1]) * ibb).clamp(0.0, 1.0);
                            let ex = px - ba[0] * t;
                            let ey = py - ba[1] * t;
                            let d = (ex * ex + ey * ey).sqrt() - (ra + (rb - ra) * t);
                            let cell = &mut row[x - bx0];
                            if d < *cell {
                                *cell = d;
                            }
                        }
                    }
                }
            }
        }
    }
    // shade: darker membrane near the outline, lighter textured interior
    let st = shape.style;
    let inv_rim = 1.0 / st.rim_w.max(0.3);
    let inv_tex = 1.0 / st.tex_scale.max(0.5);
    let (ox, oy) = (
        (shape.key & 0xFFF) as f32,
        ((shape.key >> 12) & 0xFFF) as f32,
    );
    for y in by0..by1 {
        let py = (y as f32 + 0.5) * inv;
        let row = &sdf[(y - by0) * bw..(y - by0 + 1) * bw];
        let out = &mut dark[y * w..(y + 1) * w];
        for x in bx0..bx1 {
            let d = row[x - bx0];
            if d >= 0.5 * SOFT {
                continue;
            }
            let alpha = (0.5 - d / SOFT).min(1.0);
            let depth = (-d).max(0.0);
            let mut tone = st.fill + (st.rim - st.fill) * (-depth * inv_rim).exp();
            if st.tex_amp > 0.0 {
                let px = (x as f32 + 0.5) * inv;
                tone *= 1.0 + st.tex_amp * fbm(px * inv_tex + ox, py * inv_tex + oy, shape.key);
            }
            let v = (alpha * tone).clamp(0.0, 1.0);
            let o = &mut out[x];
            if v > *o {
                *o = v;
            }
        }
    }
}

/// Separable Gaussian blur with zero padding (darkness is 0 outside the image).
fn blur(buf: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let rad = (2.5 * sigma).ceil() as isize;
    if rad < 1 {
        return buf.to_vec();
    }
    let mut k: Vec<f32> = (-rad..=rad)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (j, kv) in k.iter().enumerate() {
                let xx = x as isize + j as isize - rad;
                if xx >= 0 && (xx as usize) < w {
                    acc += kv * buf[y * w + xx as usize];
                }
            }
            tmp[y * w + x] = acc;
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for (j, kv) in k.iter().enumerate() {
            let yy = y as isize + j as isize - rad;
            if yy < 0 || yy as usize >= h {
                continue;
            }
            let src = &tmp[yy as usize * w..(yy as usize + 1) * w];
            let dst = &mut out[y * w..(y + 1) * w];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += kv * s;
            }
        }
    }
    out
}

/// Renders one organism image (grayscale u8) for class `class` — pure, deterministic in
/// (seed, class, index). Panics if `class >= num_classes`.
pub fn render(seed: u64, class: usize, num_classes: usize, index: u64) -> GrayImage {
    let def = class_def(class, num_classes);
    let mut rng = Stream::new(seed, Purpose::Synth, class as u64, index);
    let r = &mut rng;
    let size = (def.median * (def.sigma * r.normal() as f32).exp()).clamp(MIN_EXTENT, MAX_EXTENT);
    let mut shapes = {
        let mut b = Builder::new(&def, r, size);
        match def.family {
            Family::Antennae => build_antennae(&mut b),
            Family::Blob => build_blob(&mut b),
            Family::Chain => build_chain(&mut b),
            Family::Needle => build_needle(&mut b),
            Family::Rod => build_rod(&mut b),
            Family::RoundCell => build_round_cell(&mut b),
            Family::Spiny => build_spiny(&mut b),
            Family::Spiral => build_spiral(&mut b),
        }
        b.shapes
    };
    // Normalise the largest extent in the organism's own frame to `size` (pixel size carries
    // the class's real size), then orient it at random.
    let bb = bounds_of(&shapes);
    let ext = (bb[2] - bb[0]).max(bb[3] - bb[1]).max(1e-3);
    let theta = r.uniform(0.0, std::f64::consts::TAU) as f32;
    let mirror = r.bernoulli(0.5);
    transform_all(&mut shapes, theta, mirror, size / ext, [0.0, 0.0]);
    let bb = bounds_of(&shapes);
    let ext = (bb[2] - bb[0]).max(bb[3] - bb[1]);
    if !(MIN_EXTENT..=MAX_EXTENT).contains(&ext) {
        let s = ext.clamp(MIN_EXTENT, MAX_EXTENT) / ext;
        transform_all(&mut shapes, 0.0, false, s, [0.0, 0.0]);
    }
    let bb = bounds_of(&shapes);
    // occasional debris specks inside the frame
    if r.bernoulli(0.15) {
        for _ in 0..1 + r.below(3) {
            let c = [
                r.uniform(bb[0] as f64, bb[2] as f64) as f32,
                r.uniform(bb[1] as f64, bb[3] as f64) as f32,
            ];
            let rr = r.uniform(0.6, 2.0) as f32;
            let dark = r.uniform(0.2, 0.6) as f32;
            let key = r.next_u64() as u32;
            shapes.push(Shape {
                prims: vec![Prim::ellipse(c, rr, rr, 0.0)],
                style: Style::solid(dark, 0.0, 1.0),
                key,
            });
        }
    }
    // crop with a small margin (room for the blur)
    let sigma = def.blur * r.log_uniform(0.7, 1.5) as f32;
    let pad = (2.5 * sigma).ceil() + 1.0;
    let (bw, bh) = (bb[2] - bb[0], bb[3] - bb[1]);
    let ml = pad + r.uniform(1.0, 5.0) as f32;
    let mt = pad + r.uniform(1.0, 5.0) as f32;
    let mut w = (bw + ml + pad + r.uniform(1.0, 5.0) as f32).ceil() as usize;
    let mut h = (bh + mt + pad + r.uniform(1.0, 5.0) as f32).ceil() as usize;
    let mut shift = [ml - bb[0], mt - bb[1]];
    if w < MIN_SIDE {
        shift[0] += (MIN_SIDE - w) as f32 / 2.0;
        w = MIN_SIDE;
    }
    if h < MIN_SIDE {
        shift[1] += (MIN_SIDE - h) as f32 / 2.0;
        h = MIN_SIDE;
    }
    transform_all(&mut shapes, 0.0, false, 1.0, shift);

    let (sw, sh) = (w * SS, h * SS);
    let mut dark = vec![0f32; sw * sh];
    let mut sdf = Vec::new();
    for s in &shapes {
        draw_shape(s, &mut dark, sw, sh, &mut sdf);
    }
    // box-filter down to the output grid
    let norm = 1.0 / (SS * SS) as f32;
    let mut small = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for j in 0..SS {
                let row = &dark[(y * SS + j) * sw + x * SS..(y * SS + j) * sw + x * SS + SS];
                acc += row.iter().sum::<f32>();
            }
            small[y * w + x] = acc * norm;
        }
    }
    let small = blur(&small, w, h, sigma);
    // light background with a faint gradient, sensor noise
    let bg = r.uniform(241.0, 253.0) as f32;
    let gx = r.uniform(-3.0, 3.0) as f32 / w as f32;
    let gy = r.uniform(-3.0, 3.0) as f32 / h as f32;
    let noise = r.uniform(1.0, 3.0) as f32;
    let mut img = GrayImage::new(w as u32, h as u32);
    for (i, px) in img.as_mut().iter_mut().enumerate() {
        let (x, y) = ((i % w) as f32, (i / w) as f32);
        let b = bg + gx * (x - w as f32 / 2.0) + gy * (y - h as f32 / 2.0);
        // approximately standard normal: sum of four uniforms, centred and scaled
        let z = r.next_u64();
        let u4 = (z & 0xFFFF) + ((z >> 16) & 0xFFFF) + ((z >> 32) & 0xFFFF) + (z >> 48);
        let n = (u4 as f32 / 65535.0 - 2.0) * 1.732_050_8;
        let v = b * (1.0 - small[i]) + noise * n;
        *px = v.round().clamp(0.0, 255.0) as u8;
    }
    img
}

// ---------------------------------------------------------------------------------------------
// Data set writer
// ---------------------------------------------------------------------------------------------

/// Stream keys (the `a` of `Stream::new`) for the data-set level draws; class indices are small.
const ID_KEY: u64 = u64::MAX - 1;
const TEST_CLASS_KEY: u64 = u64::MAX - 2;
/// Test images use sample indices from here on, so they never repeat a training image.
const TEST_INDEX_BASE: u64 = 1 << 40;
/// JPEG quality of the written images.
const JPEG_QUALITY: u8 = 90;

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    plankton_core::fsx::write_atomic(path, bytes).map_err(|e| SynthError::Io {
        path: e.path,
        source: e.source,
    })
}

fn encode_jpeg(img: &GrayImage, path: &Path) -> Result<Vec<u8>, SynthError> {
    let mut bytes = Vec::with_capacity(img.as_raw().len() / 2 + 1024);
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY);
    enc.encode(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::L8,
    )
    .map_err(|source| SynthError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

fn validate(opts: &SynthOptions) -> Result<(), SynthError> {
    let bad = |m: String| Err(SynthError::InvalidOptions(m));
    if opts.classes == 0 {
        return bad("classes must be at least 1 (got 0)".into());
    }
    if opts.classes > 100_000 {
        return bad(format!(
            "classes must be at most 100000 (got {})",
            opts.classes
        ));
    }
    if opts.per_class == 0 {
        return bad("per_class (training images per class) must be at least 1 (got 0)".into());
    }
    let total = opts
        .classes
        .checked_mul(opts.per_class)
        .and_then(|n| n.checked_add(opts.test));
    match total {
        Some(n) if n <= 100_000_000 => Ok(()),
        _ => bad(format!(
            "too many images: {} classes x {} + {} test exceeds 100000000",
            opts.classes, opts.per_class, opts.test
        )),
    }
}

/// Writes a synthetic data set in the Kaggle competition layout into `out`:
/// `train/<class_name>/<id>.jpg`, `test/<id>.jpg`, `sampleSubmission.csv` (header
/// `image,<class 1>,...,<class N>`, uniform probabilities) and `test_labels.csv` (`image,class`).
/// Ids are unique numbers (from 100000 up, shuffled). Every file is written to a temporary name
/// and renamed, so an interrupted run leaves no partial files; rerunning rewrites the same
/// files with the same bytes. The output does not depend on `threads`.
pub fn generate(opts: &SynthOptions, out: &Path) -> Result<SynthSummary, SynthError> {
    validate(opts)?;
    let n = opts.classes;
    let names = class_names(n);
    let train_dir = out.join("train");
    let test_dir = out.join("test");
    for name in &names {
        let d = train_dir.join(name);
        fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    fs::create_dir_all(&test_dir).map_err(io_err(&test_dir))?;

    let n_train = n * opts.per_class;
    let total = n_train + opts.test;
    let mut ids: Vec<u64> = (0..total as u64).map(|i| 100_000 + i).collect();
    Stream::new(opts.seed, Purpose::Synth, ID_KEY, 0).shuffle(&mut ids);
    let mut cr = Stream::new(opts.seed, Purpose::Synth, TEST_CLASS_KEY, 0);
    let test_classes: Vec<usize> = (0..opts.test)
        .map(|_| cr.below(n as u64) as usize)
        .collect();

    let job = |k: usize| -> Result<(), SynthError> {
        let (class, index, path) = if k < n_train {
            let class = k / opts.per_class;
            let i = (k % opts.per_class) as u64;
            (
                class,
                i,
                train_dir
                    .join(&names[class])
                    .join(format!("{}.jpg", ids[k])),
            )
        } else {
            let j = k - n_train;
            (
                test_classes[j],
                TEST_INDEX_BASE + j as u64,
                test_dir.join(format!("{}.jpg", ids[k])),
            )
        };
        let img = render(opts.seed, class, n, index);
        let bytes = encode_jpeg(&img, &path)?;
        write_atomic(&path, &bytes)
    };

    // The first failure (lowest image index) stops the others and is the error reported.
    plankton_core::par::try_for_each_range(opts.threads, total, job)?;

    let p = (1.0 / n as f64).to_string();
    let header: Vec<&str> = std::iter::once("image")
        .chain(names.iter().map(String::as_str))
        .collect();
    let test_name = |j: usize| format!("{}.jpg", ids[n_train + j]);
    let sub = csv_bytes(
        &header,
        (0..opts.test).map(|j| {
            std::iter::once(test_name(j))
                .chain(std::iter::repeat_n(p.clone(), n))
                .collect::<Vec<_>>()
        }),
    );
    let labels = csv_bytes(
        &["image", "class"],
        (0..opts.test).map(|j| vec![test_name(j), names[test_classes[j]].clone()]),
    );
    write_atomic(&out.join("sampleSubmission.csv"), &sub)?;
    write_atomic(&out.join("test_labels.csv"), &labels)?;
    tracing::info!(classes = n, train = n_train, test = opts.test, out = %out.display(), "synthetic data set written");
    Ok(SynthSummary {
        class_names: names,
        train_images: n_train,
        test_images: opts.test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_sort_in_class_order() {
        for n in (1..=130).chain([121, 200, 999, 1000, 1234]) {
            let names = class_names(n);
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "n = {n}");
            sorted.dedup();
            assert_eq!(sorted.len(), n, "names not unique for n = {n}");
        }
        let names = class_names(121);
        assert!(names.iter().any(|s| s.starts_with("chain_")));
        assert!(names.iter().all(|s| s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')));
    }

    #[test]
    fn every_family_is_used_for_121_classes() {
        let mut counts = [0usize; 8];
        for c in 0..121 {
            let (f, _, _) = class_family(c, 121);
            counts[Family::ALL.iter().position(|&g| g == f).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&k| (15..=16).contains(&k)), "{counts:?}");
    }

    #[test]
    fn bad_options_are_rejected_with_a_clear_message() {
        let o = SynthOptions {
            classes: 0,
            per_class: 1,
            test: 0,
            seed: 0,
            threads: 1,
        };
        let e = validate(&o).unwrap_err().to_string();
        assert!(e.contains("classes"), "{e}");
        let o = SynthOptions {
            classes: 3,
            per_class: 0,
            test: 0,
            seed: 0,
            threads: 1,
        };
        assert!(validate(&o).unwrap_err().to_string().contains("per_class"));
    }
}

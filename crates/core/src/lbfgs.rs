//! Limited-memory BFGS for smooth unconstrained problems, with a strong-Wolfe line search.
//!
//! The stopping rules and line-search constants follow scipy's `fmin_l_bfgs_b` (L-BFGS-B 3.0
//! without bounds), which the reference blended with: stop when the largest gradient component
//! is at most `pgtol`, or when the relative decrease of f over an iteration is at most
//! `factr * machine epsilon`; sufficient decrease 1e-3 and curvature 0.9 in the line search; a
//! first step of length 1 / |d| and unit steps afterwards. The result is the same minimum, not
//! the same iterates: the line search is Nocedal & Wright's bracketing/zoom with cubic
//! interpolation rather than Moré–Thuente's `dcsrch`.

/// Settings; the defaults are scipy's as the reference called it (`pgtol=1e-9`, `maxfun=10000`,
/// default `m=10`, `factr=1e7`, `maxiter=15000`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Corrections kept (m).
    pub memory: usize,
    /// Stop when max |g_i| <= pgtol.
    pub pgtol: f64,
    /// Stop when (f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= factr * f64::EPSILON.
    pub factr: f64,
    pub max_evaluations: usize,
    pub max_iterations: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            memory: 10,
            pgtol: 1e-9,
            factr: 1e7,
            max_evaluations: 10_000,
            max_iterations: 15_000,
        }
    }
}

/// Why the minimiser stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// max |g_i| <= pgtol.
    Gradient,
    /// The relative decrease of f fell to factr * epsilon.
    RelativeReduction,
    MaxEvaluations,
    MaxIterations,
    /// No step along steepest descent satisfied the Wolfe conditions (f is flat to rounding
    /// there, or not smooth).
    LineSearch,
}

impl Stop {
    /// Whether this is one of the two convergence tests (scipy's `warnflag == 0`).
    pub fn converged(self) -> bool {
        matches!(self, Stop::Gradient | Stop::RelativeReduction)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub f: f64,
    pub gradient: Vec<f64>,
    pub iterations: usize,
    pub evaluations: usize,
    pub stop: Stop,
}

const FTOL: f64 = 1e-3;
const GTOL: f64 = 0.9;
/// Function evaluations one line search may spend (L-BFGS-B's limit).
const LINE_SEARCH_EVALS: usize = 20;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn inf_norm(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// A counted objective: `f(x, grad) -> value`, writing the gradient into `grad`.
struct Objective<F> {
    f: F,
    evaluations: usize,
}

impl<F: FnMut(&[f64], &mut [f64]) -> f64> Objective<F> {
    fn eval(&mut self, x: &[f64], g: &mut [f64]) -> f64 {
        self.evaluations += 1;
        (self.f)(x, g)
    }
}

/// Minimises `f` from `x0`. `f(x, grad)` returns f(x) and writes its gradient into `grad`.
pub fn minimize<F>(f: F, x0: &[f64], opts: &Options) -> Minimum
where
    F: FnMut(&[f64], &mut [f64]) -> f64,
{
    let n = x0.len();
    let mut obj = Objective { f, evaluations: 0 };
    let mut x = x0.to_vec();
    let mut g = vec![0.0; n];
    let mut fx = obj.eval(&x, &mut g);
    let mut iterations = 0;
    let done = |x: Vec<f64>, f: f64, gradient: Vec<f64>, iterations, evaluations, stop| Minimum {
        x,
        f,
        gradient,
        iterations,
        evaluations,
        stop,
    };
    if n == 0 || inf_norm(&g) <= opts.pgtol {
        return done(x, fx, g, 0, obj.evaluations, Stop::Gradient);
    }
    let m = opts.memory.max(1);
    // Ring of (s, y, 1 / y's), oldest first.
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::with_capacity(m);
    let mut d = vec![0.0; n];
    let mut alpha = vec![0.0; m];
    loop {
        if iterations >= opts.max_iterations {
            return done(x, fx, g, iterations, obj.evaluations, Stop::MaxIterations);
        }
        two_loop(&history, &g, &mut d, &mut alpha);
        let mut slope = dot(&g, &d);
        if slope.is_nan() || slope >= 0.0 {
            // Rounding made the quasi-Newton direction useless: restart from steepest descent.
            history.clear();
            d.iter_mut().zip(&g).for_each(|(d, g)| *d = -g);
            slope = dot(&g, &d);
        }
        let step0 = if history.is_empty() {
            1.0 / dot(&d, &d).sqrt()
        } else {
            1.0
        };
        let budget = opts.max_evaluations.saturating_sub(obj.evaluations);
        let found = line_search(
            &mut obj,
            &x,
            fx,
            slope,
            &d,
            step0,
            budget.min(LINE_SEARCH_EVALS),
        );
        let (x_new, f_new, g_new) = match found {
            Some(p) => p,
            None if obj.evaluations >= opts.max_evaluations => {
                return done(x, fx, g, iterations, obj.evaluations, Stop::MaxEvaluations);
            }
            None if !history.is_empty() => {
                // As L-BFGS-B does: forget the curvature pairs and retry along -g once.
                history.clear();
                continue;
            }
            None => return done(x, fx, g, iterations, obj.evaluations, Stop::LineSearch),
        };
        iterations += 1;
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        // Keep H positive definite: skip pairs without enough curvature (L-BFGS-B's test).
        if sy > f64::EPSILON * dot(&y, &y) {
            if history.len() == m {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        let f_old = fx;
        (x, fx, g) = (x_new, f_new, g_new);
        if inf_norm(&g) <= opts.pgtol {
            return done(x, fx, g, iterations, obj.evaluations, Stop::Gradient);
        }
        let scale = f_old.abs().max(fx.abs()).max(1.0);
        if (f_old - fx) / scale <= opts.factr * f64::EPSILON {
            return done(
                x,
                fx,
                g,
                iterations,
                obj.evaluations,
                Stop::RelativeReduction,
            );
        }
        if obj.evaluations >= opts.max_evaluations {
            return done(x, fx, g, iterations, obj.evaluations, Stop::MaxEvaluations);
        }
    }
}

/// d = -H g by the two-loop recursion, H0 = (s'y / y'y) I from the newest pair.
fn two_loop(
    history: &std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)>,
    g: &[f64],
    d: &mut [f64],
    alpha: &mut [f64],
) {
    d.iter_mut().zip(g).for_each(|(d, g)| *d = -g);
    for (i, (s, y, rho)) in history.iter().enumerate().rev() {
        alpha[i] = rho * dot(s, d);
        d.iter_mut().zip(y).for_each(|(d, y)| *d -= alpha[i] * y);
    }
    if let Some((_, y, rho)) = history.back() {
        let gamma = 1.0 / (rho * dot(y, y));
        d.iter_mut().for_each(|d| *d *= gamma);
    }
    for (i, (s, y, rho)) in history.iter().enumerate() {
        let beta = rho * dot(y, d);
        d.iter_mut()
            .zip(s)
            .for_each(|(d, s)| *d += (alpha[i] - beta) * s);
    }
}

/// A trial point of the line search: step, f, directional derivative.
#[derive(Clone, Copy)]
struct Trial {
    a: f64,
    f: f64,
    df: f64,
}

/// Minimiser of the cubic interpolating f and f' at `p` and `q`, if it exists.
fn cubic_min(p: Trial, q: Trial) -> Option<f64> {
    let d1 = p.df + q.df - 3.0 * (p.f - q.f) / (p.a - q.a);
    let disc = d1 * d1 - p.df * q.df;
    if disc.is_nan() || disc < 0.0 {
        return None;
    }
    let d2 = (q.a - p.a).signum() * disc.sqrt();
    let a = q.a - (q.a - p.a) * (q.df + d2 - d1) / (q.df - p.df + 2.0 * d2);
    a.is_finite().then_some(a)
}

/// Finds a step satisfying the strong Wolfe conditions along `d` (Nocedal & Wright, Algorithms
/// 3.5 and 3.6). Returns the new point, its value and gradient; `None` after `max_evals`
/// evaluations without one.
fn line_search<F: FnMut(&[f64], &mut [f64]) -> f64>(
    obj: &mut Objective<F>,
    x: &[f64],
    f0: f64,
    slope0: f64,
    d: &[f64],
    step0: f64,
    max_evals: usize,
) -> Option<(Vec<f64>, f64, Vec<f64>)> {
    let n = x.len();
    let mut xt = vec![0.0; n];
    let mut gt = vec![0.0; n];
    let mut evals = 0;
    let mut probe = |a: f64, xt: &mut Vec<f64>, gt: &mut Vec<f64>| -> Trial {
        for i in 0..n {
            xt[i] = x[i] + a * d[i];
        }
        let f = obj.eval(xt, gt);
        Trial {
            a,
            f,
            df: dot(gt, d),
        }
    };
    let armijo = |t: &Trial| t.f.is_finite() && t.f <= f0 + FTOL * t.a * slope0;
    let curvature = |t: &Trial| t.df.abs() <= -GTOL * slope0;

    let mut prev = Trial {
        a: 0.0,
        f: f0,
        df: slope0,
    };
    let mut a = step0;
    let (mut lo, mut hi);
    loop {
        if evals >= max_evals {
            return None;
        }
        let t = probe(a, &mut xt, &mut gt);
        evals += 1;
        if !armijo(&t) || (evals > 1 && t.f >= prev.f) {
            (lo, hi) = (prev, t);
            break;
        }
        if curvature(&t) {
            return Some((xt, t.f, gt));
        }
        if t.df >= 0.0 {
            (lo, hi) = (t, prev);
            break;
        }
        // Still descending: extrapolate, at least doubling and at most quadrupling the step.
        a = cubic_min(prev, t)
            .map(|c| c.clamp(2.0 * t.a, 4.0 * t.a))
            .unwrap_or(4.0 * t.a);
        prev = t;
    }
    // Zoom: `lo` satisfies sufficient decrease and has the lowest f seen; the minimiser lies
    // between lo and hi.
    loop {
        if evals >= max_evals {
            return None;
        }
        let width = hi.a - lo.a;
        if width.abs() <= f64::EPSILON * lo.a.abs().max(hi.a.abs()) {
            return None;
        }
        // Interpolate when hi carries a usable f (a non-finite trial gives no cubic), and keep
        // the trial away from the ends so the bracket shrinks.
        let guard = 0.1 * width.abs();
        let (left, right) = (lo.a.min(hi.a) + guard, lo.a.max(hi.a) - guard);
        let a = match hi.f.is_finite().then(|| cubic_min(lo, hi)).flatten() {
            Some(c) if c >= left && c <= right => c,
            _ => 0.5 * (lo.a + hi.a),
        };
        let t = probe(a, &mut xt, &mut gt);
        evals += 1;
        if !armijo(&t) || t.f >= lo.f {
            hi = t;
        } else {
            if curvature(&t) {
                return Some((xt, t.f, gt));
            }
            if t.df * (hi.a - lo.a) >= 0.0 {
                hi = lo;
            }
            lo = t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rosenbrock(x: &[f64], g: &mut [f64]) -> f64 {
        let mut f = 0.0;
        g.iter_mut().for_each(|g| *g = 0.0);
        for i in 0..x.len() - 1 {
            let (a, b) = (1.0 - x[i], x[i + 1] - x[i] * x[i]);
            f += a * a + 100.0 * b * b;
            g[i] += -2.0 * a - 400.0 * x[i] * b;
            g[i + 1] += 200.0 * b;
        }
        f
    }

    #[test]
    fn finds_the_rosenbrock_minimum() {
        let opts = Options {
            factr: 10.0,
            pgtol: 1e-10,
            ..Default::default()
        };
        let m = minimize(rosenbrock, &[-1.2, 1.0, -1.2, 1.0, 0.5], &opts);
        assert!(m.stop.converged(), "{:?}", m.stop);
        for v in &m.x {
            assert!((v - 1.0).abs() < 1e-5, "{:?}", m.x);
        }
        assert!(m.f < 1e-10, "{}", m.f);
        assert!(m.evaluations < 200, "{}", m.evaluations);
    }

    #[test]
    fn quadratic_converges_on_the_gradient_test() {
        let diag = [1.0, 10.0, 100.0];
        let f = |x: &[f64], g: &mut [f64]| {
            let mut v = 0.0;
            for i in 0..3 {
                g[i] = diag[i] * (x[i] - i as f64);
                v += 0.5 * diag[i] * (x[i] - i as f64).powi(2);
            }
            v
        };
        let opts = Options {
            factr: 0.0,
            ..Default::default()
        };
        let m = minimize(f, &[5.0, 5.0, 5.0], &opts);
        assert_eq!(m.stop, Stop::Gradient);
        for (i, v) in m.x.iter().enumerate() {
            assert!((v - i as f64).abs() < 1e-9, "{:?}", m.x);
        }
    }

    #[test]
    fn a_stationary_start_returns_at_once() {
        let m = minimize(
            |_x: &[f64], g: &mut [f64]| {
                g[0] = 0.0;
                3.0
            },
            &[1.0],
            &Options::default(),
        );
        assert_eq!(
            (m.stop, m.iterations, m.evaluations),
            (Stop::Gradient, 0, 1)
        );
    }
}

//! The unknown-image scores and the drift divergence against numpy / scipy / scikit-learn
//! (tests/fixtures/unknown/gen_unknown_fixtures.py).

use plankton_core::unknown::{auroc, energy, max_probability, FeatureSpace};

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/unknown/unknown_fixture.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn energy_and_max_probability_match_scipy() {
    let f = fixture();
    let k = f["logit_classes"].as_u64().unwrap() as usize;
    let logits: Vec<f32> = floats(&f["logits"]).into_iter().map(|v| v as f32).collect();
    for (i, row) in logits.chunks(k).enumerate() {
        let want = floats(&f["energy"])[i];
        assert!(
            (energy(row) - want).abs() < 1e-9 * want.abs().max(1.0),
            "row {i}"
        );
        let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let p: Vec<f32> = e.iter().map(|v| (v / sum) as f32).collect();
        assert!(
            (max_probability(&p) - floats(&f["max_probability"])[i]).abs() < 1e-6,
            "row {i}"
        );
    }
}

#[test]
fn mahalanobis_matches_numpy() {
    let f = fixture();
    let (classes, dim) = (
        f["classes"].as_u64().unwrap() as usize,
        f["dim"].as_u64().unwrap() as usize,
    );
    let train: Vec<f32> = floats(&f["train_features"])
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let labels: Vec<u32> = f["train_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let space =
        FeatureSpace::fit(&train, &labels, classes, dim, f["ridge"].as_f64().unwrap()).unwrap();
    let test: Vec<f32> = floats(&f["test_features"])
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let want = floats(&f["mahalanobis"]);
    for (i, x) in test.chunks(dim).enumerate() {
        let got = space.mahalanobis(x);
        assert!(
            (got - want[i]).abs() < 1e-6 * want[i].max(1.0),
            "point {i}: {got} vs {}",
            want[i]
        );
    }
    // Points near a class centre are closer than the far ones (5 near, then 5 far).
    assert!(want[..5]
        .iter()
        .all(|&n| want[5..].iter().all(|&far| n < far)));
}

#[test]
fn auroc_matches_scikit_learn_with_ties() {
    let f = fixture();
    let unknown: Vec<bool> = f["unknown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let got = auroc(&floats(&f["scores"]), &unknown).unwrap();
    assert!((got - f["auroc"].as_f64().unwrap()).abs() < 1e-12, "{got}");
}

#[test]
fn js_divergence_matches_scipy() {
    let f = fixture();
    for pair in f["js_pairs"].as_array().unwrap() {
        let got =
            plankton_core::drift::js_divergence(&floats(&pair["p"]), &floats(&pair["q"])).unwrap();
        let want = pair["js"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}

//! Replays the fuzz corpora and every crash the fuzzers found (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the fuzz targets' bodies: errors are fine, a panic fails.
//! (An abort, a hang or exhausted memory fails the test run itself.)

#[path = "../../fuzz/src/bodies.rs"]
mod bodies;

use std::path::Path;

#[test]
fn corpora_and_regressions_replay_without_panics() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut report = Vec::new();
    for (name, body) in bodies::TARGETS {
        let (seeds, mut panicked) = bodies::replay(&fuzz.join("corpus").join(name), *body);
        assert!(seeds > 0, "fuzz/corpus/{name}/ is empty or missing");
        let (_, more) = bodies::replay(&fuzz.join("regressions").join(name), *body);
        panicked.extend(more);
        report.extend(panicked.iter().map(|p| format!("{name}: {}", p.display())));
    }
    bodies::remove_scratch();
    assert!(report.is_empty(), "panicked on:\n{}", report.join("\n"));
}

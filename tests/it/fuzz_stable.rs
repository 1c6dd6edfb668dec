//! Issue 8 item 6 on stable, in CI: the three cargo-fuzz targets (`fuzz/`) driven by proptest
//! over the corpus files and their mutations (bit flips, truncations, splices, insertions) and
//! over arbitrary strings. Same check functions as the fuzz targets, included by path.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::corpus::load_cases;

/// Seeds larger than this are checked once as they are, not mutated (keeps CI under a minute).
const MAX_MUTATED_SEED: usize = 64 * 1024;
const CASES_PER_TARGET: u32 = 1500;

type Check = fn(&[u8]);
const TARGETS: [(&str, Check); 3] = [
    ("frame_head", checks::frame_head),
    ("tap", checks::tap),
    ("lago_response", checks::lago_response),
];

/// Lago bodies and 429 headers the corpus lacks: the mutations start from these too.
const LAGO_SEEDS: &[&str] = &[
    r#"{"events":[{"lago_id":"1","transaction_id":"t","external_subscription_id":"s","code":"kwh","timestamp":"2024-01-01T00:00:00Z","properties":{"value":"1.5"}}]}"#,
    r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"0":{"transaction_id":["value_already_exist"]}}}"#,
    r#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":"expression failed"}"#,
    r#"{"billable_metric":{"lago_id":"m","name":"kWh","code":"kwh","aggregation_type":"sum_agg","field_name":"value","recurring":false,"expression":null}}"#,
    r#"{"subscription":{"lago_id":"s","external_id":"e","external_customer_id":"c","plan_code":"p","status":"active"}}"#,
    "5\n1700000100",
    "Wed, 21 Oct 2015 07:28:00 GMT\n",
    "\n18446744073709551615",
    "\n1e30",
    "\n1700000100.5",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        len: usize,
    },
    Splice {
        other: usize,
        at: usize,
        from: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(other, at, from)| Mutation::Splice { other, at, from }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for m in mutations {
        let n = bytes.len();
        match m {
            Mutation::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
            Mutation::Truncate { len } => bytes.truncate(len % (n + 1)),
            Mutation::Splice { other, at, from } => {
                let other = &seeds[other % seeds.len()];
                bytes.truncate(at % (n + 1));
                bytes.extend_from_slice(&other[from % (other.len() + 1)..]);
            }
            Mutation::Insert { at, bytes: extra } => {
                let at = at % (n + 1);
                bytes.splice(at..at, extra.iter().copied());
            }
            Mutation::Delete { at, len } if n > 0 => {
                let at = at % n;
                bytes.drain(at..(at + len).min(n));
            }
            _ => {}
        }
    }
    bytes
}

fn seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (small, large): (Vec<Vec<u8>>, Vec<Vec<u8>>) = load_cases()
        .into_iter()
        .map(|(_, bytes)| bytes)
        .chain(LAGO_SEEDS.iter().map(|s| s.as_bytes().to_vec()))
        .partition(|b| b.len() <= MAX_MUTATED_SEED);
    (small, large)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES_PER_TARGET,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn fuzz_targets_hold_on_every_corpus_file_as_is() {
    let (small, large) = seeds();
    for bytes in small.iter().chain(&large) {
        for (_, check) in TARGETS {
            check(bytes);
        }
    }
}

#[test]
fn fuzz_targets_hold_on_mutated_corpus_files() {
    let (seeds, _) = seeds();
    for (name, check) in TARGETS {
        let strategy = (0..seeds.len(), prop::collection::vec(mutation(), 1..6));
        runner()
            .run(&strategy, |(seed, mutations)| {
                check(&apply(&seeds[seed], &mutations, &seeds));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("fuzz target {name}: {e}"));
    }
}

#[test]
fn fuzz_targets_hold_on_arbitrary_input() {
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "\\PC{0,256}".prop_map(String::into_bytes),
        // Near-frames: OCPP-J shapes with random tails, where the parsers disagree if anywhere.
        "[ \\t]*\\[[ ]*[0-9]{1,2}[ ]*,[ ]*\"[a-z\\\\\"u0-9]{0,6}\"[ ]*(,[ ]*\"[A-Za-z]{0,12}\")?[ ]*,[ ]*[\\[\\]{}0-9,.eE+\\-\" :a-z]{0,24}\\]?[ \\t\\n]*"
            .prop_map(String::into_bytes),
    ];
    for (name, check) in TARGETS {
        runner()
            .run(&strategy, |bytes| {
                check(&bytes);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("fuzz target {name}: {e}"));
    }
}

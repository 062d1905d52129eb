//! Issue 16, "Prove": no `unwrap`/`expect`/indexing on bytes from the network, the store
//! or a manifest. The lints are denied on the modules that read such bytes (src/lib.rs),
//! and CI runs clippy with warnings as errors; this test keeps the list from shrinking.

const UNTRUSTED_INPUT_MODULES: &[&str] = &[
    "connected",
    "crypto",
    "drill",
    "outbox",
    "retention",
    "selfupdate",
    "session",
    "storage",
    "verify",
    "wire",
];

#[test]
fn untrusted_input_modules_deny_unwrap_expect_and_indexing() {
    let lib = include_str!("../../src/lib.rs");
    let lines: Vec<&str> = lib.lines().collect();
    for module in UNTRUSTED_INPUT_MODULES {
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("pub mod {module};"))
            .unwrap_or_else(|| panic!("src/lib.rs has no `pub mod {module};`"));
        let attr = at.checked_sub(1).and_then(|i| lines.get(i)).copied().unwrap_or_default();
        for lint in ["clippy::unwrap_used", "clippy::expect_used", "clippy::indexing_slicing"] {
            assert!(
                attr.starts_with("#[deny(") && attr.contains(lint),
                "`pub mod {module};` in src/lib.rs must be preceded by #[deny(...{lint}...)], found {attr:?}"
            );
        }
    }
    let clippy = include_str!("../../clippy.toml");
    for key in ["allow-unwrap-in-tests", "allow-expect-in-tests", "allow-indexing-slicing-in-tests"] {
        assert!(clippy.contains(&format!("{key} = true")), "clippy.toml: {key}");
    }
}

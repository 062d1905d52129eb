//! Container references as Docker accepts them. Kept apart from the Engine API client so
//! that the config parser and the restore CLI can check a name without depending on
//! the client, the exec code or the drivers. Pure functions, any thread.

/// Docker's own rule for container names, and ids (hex): anything else is refused before
/// it reaches a URL.
pub fn check_container_ref(container: &str) -> Result<(), String> {
    let name = container.strip_prefix('/').unwrap_or(container);
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok { Ok(()) } else { Err(format!("{container:?} is not a container name or id")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_docker_container_names_pass() {
        for ok in ["db", "app_db-1", "/compose-db-1", "3f2c9a0b1d"] {
            assert!(check_container_ref(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "../x", "a/b", "db?x=1", "-rm", "a b", &"x".repeat(300)] {
            assert!(check_container_ref(bad).is_err(), "{bad}");
        }
    }
}

//! `backupy-agent discover`: one Docker discovery scan printed as a table, as JSON, or as
//! standalone TOML targets and jobs ready to paste (passwords as `env:` references).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::docker::{Client, discovery};
use crate::wire::pb::DiscoveredContainer;

/// Runs the scan and prints it; an unreachable daemon is an error that says what to do.
pub fn run(json: bool, toml: bool) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    let found = discovery::scan(&client)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&discovery::to_json(&found))?);
    } else if toml {
        print!("{}", to_toml(&found));
    } else if found.is_empty() {
        println!(
            "no database containers found (Docker {} on {})",
            client.daemon_version(),
            client.socket().display()
        );
    } else {
        for c in &found {
            println!("{}", table_line(c));
        }
    }
    Ok(())
}

fn table_line(c: &DiscoveredContainer) -> String {
    let ports: Vec<String> = c
        .ports
        .iter()
        .map(|p| {
            if p.host_port == 0 {
                format!("{}/{}", p.container_port, p.protocol)
            } else {
                format!("{}->{}/{}", p.host_port, p.container_port, p.protocol)
            }
        })
        .collect();
    let hints: BTreeMap<_, _> = c.env_hints.iter().collect();
    let hints: Vec<String> = hints.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}\t{}\t{}\tports={}\tnetworks={}\t{}",
        c.name,
        c.detected_db_type,
        c.image,
        ports.join(","),
        c.networks.join(","),
        hints.join(" ")
    )
}

/// A TOML basic string (quotes and escapes as the toml crate writes them).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn hint<'a>(c: &'a DiscoveredContainer, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| c.env_hints.get(*n).map(String::as_str)).filter(|v| *v != "set")
}

fn has_secret(c: &DiscoveredContainer, names: &[&str]) -> bool {
    names.iter().any(|n| c.env_hints.get(*n).is_some_and(|v| v == "set"))
}

/// An id usable as a target id and, upper-cased, as an environment variable name.
fn ident(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "container".into() } else { s.chars().take(60).collect() }
}

/// Standalone targets and nightly jobs for what discovery found.
pub fn to_toml(found: &[DiscoveredContainer]) -> String {
    let mut out = String::from(
        "# Found by `backupy-agent discover --toml`. Set each password variable named below in the\n\
         # agent's environment; no password value is written here.\n",
    );
    for c in found {
        let id = ident(&c.name);
        let env_name = format!("{}_PASSWORD", id.to_ascii_uppercase().replace('-', "_"));
        let mut fields: Vec<(&str, String)> = Vec::new();
        let password = |names: &[&str]| has_secret(c, names).then(|| quoted(&format!("env:{env_name}")));
        match c.detected_db_type.as_str() {
            "postgresql" => {
                let user = hint(c, &["POSTGRES_USER", "POSTGRESQL_USERNAME"]).unwrap_or("postgres");
                let db = hint(c, &["POSTGRES_DB", "POSTGRESQL_DATABASE"]).unwrap_or(user);
                fields.push(("username", quoted(user)));
                fields.push(("database", quoted(db)));
                if let Some(p) =
                    password(&["POSTGRES_PASSWORD", "POSTGRES_PASSWORD_FILE", "POSTGRESQL_PASSWORD"])
                {
                    fields.push(("password", p));
                }
            }
            "mysql" | "mariadb" => {
                let user = hint(c, &["MARIADB_USER", "MYSQL_USER"]);
                let db = hint(c, &["MARIADB_DATABASE", "MYSQL_DATABASE"]).unwrap_or("");
                let (user, secret_names): (&str, &[&str]) = match user {
                    Some(u) => (
                        u,
                        &[
                            "MARIADB_PASSWORD",
                            "MYSQL_PASSWORD",
                            "MARIADB_PASSWORD_FILE",
                            "MYSQL_PASSWORD_FILE",
                        ],
                    ),
                    None => (
                        "root",
                        &[
                            "MARIADB_ROOT_PASSWORD",
                            "MYSQL_ROOT_PASSWORD",
                            "MARIADB_ROOT_PASSWORD_FILE",
                            "MYSQL_ROOT_PASSWORD_FILE",
                        ],
                    ),
                };
                fields.push(("username", quoted(user)));
                if !db.is_empty() {
                    fields.push(("database", quoted(db)));
                }
                if let Some(p) = password(secret_names) {
                    fields.push(("password", p));
                }
            }
            "mongodb" => {
                if let Some(u) = hint(c, &["MONGO_INITDB_ROOT_USERNAME", "MONGODB_ROOT_USER"]) {
                    fields.push(("username", quoted(u)));
                }
                if let Some(p) = password(&[
                    "MONGO_INITDB_ROOT_PASSWORD",
                    "MONGO_INITDB_ROOT_PASSWORD_FILE",
                    "MONGODB_ROOT_PASSWORD",
                ]) {
                    fields.push(("password", p));
                }
            }
            "redis" => {
                if let Some(p) = password(&["REDIS_PASSWORD", "REDIS_PASSWORD_FILE"]) {
                    fields.push(("password", p));
                }
            }
            _ => {}
        }
        if c.detected_db_type == "sqlite" {
            let files = c.env_hints.get("sqlite_files").map(String::as_str).unwrap_or("");
            for (n, file) in files.split(',').filter(|f| !f.is_empty()).enumerate() {
                let tid = if n == 0 { format!("{id}-sqlite") } else { format!("{id}-sqlite-{}", n + 1) };
                target_and_job(&mut out, c, &tid, "sqlite", &[("path", quoted(file))]);
            }
            continue;
        }
        target_and_job(&mut out, c, &id, &c.detected_db_type, &fields);
    }
    out
}

fn target_and_job(
    out: &mut String,
    c: &DiscoveredContainer,
    id: &str,
    kind: &str,
    fields: &[(&str, String)],
) {
    let _ = writeln!(out, "\n# {} ({})", c.name.replace('\n', " "), c.image.replace('\n', " "));
    let _ = writeln!(out, "[[targets]]\nid = {}\ntype = {}", quoted(id), quoted(kind));
    let _ = writeln!(out, "strategy = \"docker_exec\"\ncontainer = {}", quoted(&c.name));
    for (k, v) in fields {
        let _ = writeln!(out, "{k} = {v}");
    }
    let _ = writeln!(
        out,
        "\n[[jobs]]\nid = {}\ntarget = {}\ncron = \"0 3 * * *\"\nkeep_last = 7",
        quoted(&format!("{id}-nightly")),
        quoted(id)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_names_password_variables_and_never_values() {
        let c = DiscoveredContainer {
            container_id: "c1".into(),
            name: "shop-db-1".into(),
            image: "postgres:16".into(),
            detected_db_type: "postgresql".into(),
            env_hints: [("POSTGRES_USER", "shop"), ("POSTGRES_DB", "orders"), ("POSTGRES_PASSWORD", "set")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let text = to_toml(&[c]);
        let v: toml::Table = text.parse().expect("valid TOML");
        let t = &v["targets"].as_array().unwrap()[0];
        assert_eq!(t["container"].as_str(), Some("shop-db-1"));
        assert_eq!(t["strategy"].as_str(), Some("docker_exec"));
        assert_eq!(t["username"].as_str(), Some("shop"));
        assert_eq!(t["database"].as_str(), Some("orders"));
        assert_eq!(t["password"].as_str(), Some("env:SHOP_DB_1_PASSWORD"));
        assert_eq!(v["jobs"].as_array().unwrap()[0]["target"].as_str(), Some("shop-db-1"));
    }
}

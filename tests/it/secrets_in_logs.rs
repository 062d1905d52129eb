//! A full run at trace level with planted secrets — database passwords (by reference,
//! inside a URL, and wrong ones that make a run fail), the S3 secret, the agent key —
//! none of them appears in any log line or error message.

use crate::common::db;

use crate::common::s3::*;
use crate::common::*;

#[test]
fn no_planted_secret_reaches_a_log_line_at_trace_level() {
    let env = s3_env();
    let pg = db::pg();
    let redis_port = db::need("BACKUPY_TEST_REDIS_PORT", "redis");
    let bucket = new_bucket(&env, "secrets");
    let dir = tempfile::tempdir().unwrap();
    let src = db::unique("sec");
    let mut admin = postgres::Client::connect(
        &format!(
            "host={} port={} user={} password={} dbname=postgres",
            pg.host, pg.port, pg.user, pg.password
        ),
        postgres::NoTls,
    )
    .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {src}")).unwrap();
    let wrong_redis_pw = "planted-wrong-redis-password-91c";
    let url_pw = "planted-url-password-4d2";
    let agent_key = "planted-agent-key-0e77f1";
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "./state"
[storage.s3]
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
access_key_id = "env:TEST_S3_KEY"
secret_access_key = "env:TEST_S3_SECRET"
[[targets]]
id = "pg"
type = "postgresql"
url = "postgres://{user}@{host}:{port}/{src}"
password = "env:TEST_PG_PW"
[[targets]]
id = "pg-url"
type = "postgresql"
url = "postgres://{user}:{url_pw}@{host}:{port}/{src}"
[[targets]]
id = "cache"
type = "redis"
url = "redis://127.0.0.1:{redis_port}"
password = "literal:{wrong_redis_pw}"
[[jobs]]
id = "pg"
target = "pg"
encryption = "none"
[[jobs]]
id = "pg-url"
target = "pg-url"
encryption = "none"
[[jobs]]
id = "cache"
target = "cache"
encryption = "none"
"#,
            endpoint = env.endpoint,
            region = env.region,
            user = pg.user,
            host = pg.host,
            port = pg.port,
        ),
    )
    .unwrap();
    let mut c = agent();
    c.args(["backup", "--config"])
        .arg(&config)
        .env("BACKUPY_LOG_LEVEL", "trace")
        .env("BACKUPY_AGENT_KEY", agent_key)
        .env("TEST_S3_KEY", &env.access_key)
        .env("TEST_S3_SECRET", &env.secret_key)
        .env("TEST_PG_PW", &pg.password);
    let out = run(c);
    let all = text(&out.stdout) + &text(&out.stderr);
    // The job with the password by reference succeeds; the URL and redis passwords are
    // wrong, so those runs fail — with errors that must not quote them.
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert_eq!(all.matches("\tok\t").count(), 1, "{all}");
    assert!(all.contains("job cache") && all.contains("job pg-url"), "{all}");
    assert!(all.lines().count() > 10, "trace logging produced lines: {all}");
    for secret in [pg.password.as_str(), url_pw, wrong_redis_pw, agent_key, env.secret_key.as_str()] {
        assert!(!all.contains(secret), "a planted secret leaked into the output:\n{all}");
    }
    assert!(!all.contains("X-Amz-Signature="), "no presigned query string: {all}");
}

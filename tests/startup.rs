//! Startup and config abuse (issue 5.8): every bad start ends in one line naming the problem
//! and exit 78 (EX_CONFIG), never a panic or a backtrace.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::*;

fn expect_78(config: &std::path::Path, args: &[&str], must_name: &str) {
    let out = run_mailqueue(config, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(must_name), "{must_name:?} not named in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn every_bad_start_is_one_line_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let good = base_config(&db, 25);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // The file itself.
    expect_78(
        &dir.path().join("missing.toml"),
        &["run", "--once"],
        "missing.toml",
    );
    expect_78(dir.path(), &["check-config"], "cannot read config file");
    expect_78(
        &write("syntax.toml", "[queue\ndatabase ="),
        &["run"],
        "syntax.toml line 1",
    );
    // Each kind of bad value, one at a time.
    let cases: &[(&str, &str, &str)] = &[
        (
            "poll_interval = \"50ms\"",
            "poll_interval = \"often\"",
            "queue.poll_interval",
        ),
        ("max_attempts = 5", "max_attempts = 0", "queue.max_attempts"),
        (
            "max_attempts = 5",
            "max_attempts = -1",
            "queue.max_attempts",
        ),
        (
            "retry_backoff = [\"1s\", \"5s\"]",
            "retry_backoff = []",
            "queue.retry_backoff",
        ),
        (
            "from_address = \"crm@example.com\"",
            "from_address = \"crm\"",
            "sender.from_address",
        ),
        (
            "local_hostname = \"crm.example.test\"",
            "local_hostname = \"bad name\"",
            "sender.local_hostname",
        ),
        ("port = 25", "port = 70000", "smtp.port"),
        ("tls = \"none\"", "tls = \"ssl\"", "smtp.tls"),
        (
            "transport = \"smtp\"",
            "transport = \"carrier-pigeon\"",
            "smtp.transport",
        ),
        ("timeout = \"10s\"", "timeout = \"0s\"", "smtp.timeout"),
        ("interval_ms = 0", "interval_ms = -5", "rate.interval_ms"),
        ("level = \"info\"", "level = \"[[[\"", "log.level"),
        (
            "level = \"info\"",
            "level = \"info\"\nerror_language = \"fr\"",
            "log.error_language",
        ),
        ("[rate]", "[rate]\nburst = 0", "rate.burst"),
        ("[queue]", "[queue]\nunknown_key = 1", "queue.unknown_key"),
        ("[queue]", "[queue]\non_doubt = \"maybe\"", "queue.on_doubt"),
        ("[queue]", "[queue]\ncommit_batch = 0", "queue.commit_batch"),
        (
            "[queue]",
            "[queue]\ncommit_batch = 1001",
            "queue.commit_batch",
        ),
        ("auth = false", "auth = true\nuser = \"u\"", "smtp.password"),
    ];
    for (from, to, key) in cases {
        assert!(good.contains(from), "{from}");
        let p = write("bad.toml", &good.replacen(from, to, 1));
        expect_78(&p, &["check-config"], key);
        expect_78(&p, &["run", "--once"], key);
    }
    // A secret file others may read.
    let secret = write("pw", "hunter2\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let with_secret = good.replace(
        "auth = false",
        &format!(
            "auth = true\nuser = \"u\"\npassword_file = {}",
            toml_str(secret.to_str().unwrap())
        ),
    );
    expect_78(
        &write("secret.toml", &with_secret),
        &["run", "--once"],
        "chmod 600",
    );
    // [smtp.oauth2]: each kind of mistake names its key.
    let refresh = write("refresh_token", "1//r\n");
    std::fs::set_permissions(&refresh, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_refresh = write("refresh_open", "1//r\n");
    std::fs::set_permissions(&open_refresh, std::fs::Permissions::from_mode(0o644)).unwrap();
    let rt =
        |f: &std::path::Path| format!("refresh_token_file = {}", toml_str(f.to_str().unwrap()));
    let ok_table = format!(
        "token_url = \"https://oauth2.example.com/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{}",
        rt(&refresh)
    );
    let oauth = |smtp: &str, table: &str| {
        good.replace(
            "auth = false",
            &format!("auth = true\nuser = \"u\"\n{smtp}"),
        )
        .replace("[rate]", &format!("[smtp.oauth2]\n{table}\n\n[rate]"))
    };
    let ok = write("oauth-ok.toml", &oauth("", &ok_table));
    let out = run_mailqueue(&ok, &["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oauth_cases: Vec<(String, String, &str)> = vec![
        (
            String::new(),
            ok_table.replace("token_url = \"https://oauth2.example.com/token\"\n", ""),
            "smtp.oauth2.token_url",
        ),
        (
            String::new(),
            ok_table.replace("https://oauth2.example.com", "http://oauth2.example.com"),
            "must be https",
        ),
        (
            String::new(),
            ok_table.replace("client_id = \"c\"\n", ""),
            "smtp.oauth2.client_id",
        ),
        (
            String::new(),
            format!("{ok_table}\nclient_secret_file = \"/x\""),
            "smtp.oauth2.client_secret",
        ),
        (
            String::new(),
            ok_table.replace(&rt(&refresh), &rt(&open_refresh)),
            "chmod 600",
        ),
        (
            String::new(),
            ok_table.replace(&rt(&refresh), ""),
            "smtp.oauth2.refresh_token_file",
        ),
        (
            String::new(),
            format!("{ok_table}\ntokenurl = \"x\""),
            "tokenurl",
        ),
        ("password = \"p\"".into(), ok_table.clone(), "smtp.oauth2"),
        (
            "auth_mechanism = \"plain\"".into(),
            ok_table.clone(),
            "smtp.auth_mechanism",
        ),
    ];
    for (smtp, table, key) in &oauth_cases {
        let p = write("oauth-bad.toml", &oauth(smtp, table));
        expect_78(&p, &["check-config"], key);
    }
    let no_auth = good.replace("[rate]", &format!("[smtp.oauth2]\n{ok_table}\n\n[rate]"));
    expect_78(
        &write("oauth-noauth.toml", &no_auth),
        &["check-config"],
        "smtp.oauth2",
    );
    // The queue file: in a missing directory, and from a newer mailqueue.
    let nowhere = good.replace(
        db.to_str().unwrap(),
        dir.path().join("no/such/dir/queue.db").to_str().unwrap(),
    );
    expect_78(
        &write("nowhere.toml", &nowhere),
        &["run", "--once"],
        "does not exist",
    );
    let cfg = write("ok.toml", &good);
    migrate(&cfg);
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();
    expect_78(&cfg, &["run", "--once"], "newer than this mailqueue knows");
    expect_78(&cfg, &["status"], "newer than this mailqueue knows");
}

#[test]
fn usage_errors_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &base_config(&dir.path().join("q.db"), 25));
    for args in [
        &["frobnicate"][..],
        &["show", "not-a-number"],
        &["enqueue", "--to", "a@example.com"],
    ] {
        let out = run_mailqueue(&cfg, args);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// docs/configuration.md lists every key the code accepts: each field of the file's sections
/// in src/config.rs (the `Raw*` structs, which `deny_unknown_fields`) appears as `section.key`.
#[test]
fn the_configuration_reference_lists_every_key() {
    let src = std::fs::read_to_string(manifest_dir().join("src/config.rs")).unwrap();
    let doc = std::fs::read_to_string(manifest_dir().join("docs/configuration.md")).unwrap();
    let sections = [
        ("RawQueue", "queue"),
        ("RawSender", "sender"),
        ("RawSmtp", "smtp"),
        ("RawOAuth2", "smtp.oauth2"),
        ("RawPop", "pop_before_smtp"),
        ("RawRate", "rate"),
        ("RawLog", "log"),
        ("RawMetrics", "metrics"),
    ];
    let mut n = 0;
    for (st, section) in sections {
        let body = src
            .split(&format!("struct {st} {{"))
            .nth(1)
            .unwrap_or_else(|| panic!("{st}"));
        let body = body.split("\n}").next().unwrap();
        for line in body.lines().map(str::trim) {
            if line.starts_with("//") || line.starts_with('#') || !line.contains(':') {
                continue;
            }
            let key = line.split(':').next().unwrap().trim();
            assert!(
                doc.contains(&format!("`{section}.{key}`")),
                "{section}.{key} is not in docs/configuration.md"
            );
            n += 1;
        }
    }
    assert!(n > 40, "found only {n} keys: the parser above is broken");
}

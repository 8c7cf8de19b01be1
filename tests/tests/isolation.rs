//! Deny-by-default WASI: no files, environment or sockets unless granted;
//! stdout/stderr land in the runtime log tagged with the handler.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use weir_e2e::*;

async fn answers(
    extra: &str,
    env: &[(&str, &str)],
    cmds: &[&str],
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let input = unique("sandbox");
    let output = format!("{input}.out");
    let group = unique("sandbox-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    let events: Vec<In> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| In::envelope("k", &format!("c{i}"), "c", "cmd", json!(c)))
        .collect();
    produce(&input, &events).await?;
    let handler = HandlerSpec::new("prober", "misbehave", &input).extra(extra);
    let weir = Weir::start_with_env(&config_toml(&group, &[handler]), env)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let log = weir.log();
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let out = read_all(&output)?
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap()).into_owned())
        .collect();
    Ok((out, log))
}

#[tokio::test(flavor = "multi_thread")]
async fn files_environment_and_sockets_are_denied_by_default() -> anyhow::Result<()> {
    let (out, log) = answers(
        "",
        &[("WEIR_TEST_SECRET", "s3cret")],
        &[
            "read:/etc/hostname",
            "env:WEIR_TEST_SECRET",
            &format!("connect:{}", brokers()),
            "print:hello from the guest",
        ],
    )
    .await?;
    assert!(out[0].starts_with("read denied"), "{}", out[0]);
    assert!(out[1].starts_with("env denied"), "{}", out[1]);
    assert!(out[2].starts_with("connect denied"), "{}", out[2]);
    assert_eq!(out[3], "printed");
    let line = log
        .iter()
        .find(|l| l.contains("hello from the guest") && !l.contains("stderr"))
        .expect("stdout line in the log");
    assert!(line.contains("prober") && line.contains("stdout"), "{line}");
    assert!(log
        .iter()
        .any(|l| l.contains("hello from the guest (stderr)") && l.contains("prober")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn granted_environment_and_read_only_folder_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("rates.txt"), "eur=1.0")?;
    let extra = format!(
        "allow_env = [\"WEIR_TEST_GRANTED\"]\nread_only_dir = {:?}",
        dir.path().display().to_string()
    );
    let (out, _) = answers(
        &extra,
        &[("WEIR_TEST_GRANTED", "yes"), ("WEIR_TEST_SECRET", "no")],
        &[
            "read:/data/rates.txt",
            "env:WEIR_TEST_GRANTED",
            "env:WEIR_TEST_SECRET",
            "read:/etc/hostname",
        ],
    )
    .await?;
    assert_eq!(out[0], "read ok: eur=1.0");
    assert_eq!(out[1], "env ok: yes");
    assert!(out[2].starts_with("env denied"), "{}", out[2]);
    assert!(out[3].starts_with("read denied"), "{}", out[3]);
    Ok(())
}

#![allow(clippy::unwrap_used)]
//! The harness's own promises: nats-server with JetStream on a port that
//! survives a restart.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

use e2e::NatsServer;

/// The server's INFO line, the first thing it says to a client.
fn info(server: &NatsServer) -> String {
    let stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn nats_server_restarts_on_the_same_port_and_store() {
    let mut server = NatsServer::start();
    let url = server.url();
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    let before = info(&server);
    assert!(before.starts_with("INFO "), "{before}");
    assert!(before.contains(r#""jetstream":true"#), "{before}");
    assert!(
        server.store_dir().join("jetstream").is_dir(),
        "JetStream made no store"
    );

    server.restart();
    assert_eq!(server.url(), url);
    let after = info(&server);
    assert!(after.contains(r#""jetstream":true"#), "{after}");
    let id = |info: &str| {
        info.split(r#""server_id":""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_owned)
    };
    assert_ne!(id(&before), id(&after), "the same process still answers");
    assert!(server.log().contains("Server is ready"), "{}", server.log());
}

#[test]
fn nats_server_reads_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nats.conf");
    std::fs::write(&config, "server_name: podfleet-e2e\n").unwrap();
    let server = NatsServer::start_with_config(&config);
    let info = info(&server);
    assert!(info.contains(r#""server_name":"podfleet-e2e""#), "{info}");
}

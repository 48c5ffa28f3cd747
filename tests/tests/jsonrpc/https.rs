//! HTTPS terminated at the sentry, and a reload that rereads the certificate.

use super::*;
use relay_core::reload::Reload;

/// A fresh self-signed certificate for `rpc.example`, written as PEM files in `dir`; its DER.
fn write_certificate(dir: &std::path::Path) -> Vec<u8> {
    let generated = rcgen::generate_simple_self_signed(vec!["rpc.example".to_owned()]).unwrap();
    std::fs::write(dir.join("rpc.crt"), generated.cert.pem()).unwrap();
    let key = dir.join("rpc.key");
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    generated.cert.der().to_vec()
}

/// An HTTPS client connection trusting only `root`.
async fn connect_tls(addr: SocketAddr, root: &[u8]) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("rpc.example").unwrap();
    let tls = tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .unwrap()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_terminated_at_the_sentry_and_a_reload_rereads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_certificate(dir.path());
    let (node_addr, node) = rpc_node::start().await;
    let (sentry_key, agent_key) = (key(), key());
    let extra = format!(
        "protocol = \"jsonrpc\"\n[route.jsonrpc]\npreset = \"icon\"\n[route.tls]\ncert = \"{0}/rpc.crt\"\nkey = \"{0}/rpc.key\"\n",
        dir.path().display()
    );
    let config = sentry_config(&[("v1", &agent_key)], &[("rpc", &["v1/rpc"], &extra)]);
    let sentry = start_sentry(&config, &sentry_key).await;
    let _agent = start_agent(
        agent_config(
            "v1",
            sentry.handle.quic_addr().expect("quic_listen is set"),
            &sentry_key,
            &[("rpc", node_addr)],
        ),
        agent_key.clone(),
    );
    sentry.wait_agent("v1", true).await;
    let addr = sentry.route("rpc");

    let mut sender = connect_tls(addr, &first).await.unwrap();
    let answer = send(&mut sender, "POST", "/api/v3", &[], CALL).await;
    assert_eq!(answer.json()["id"], 7);
    assert_eq!(
        send(&mut sender, "POST", "/admin/chain", &[], CALL)
            .await
            .status,
        403
    );
    let seen = node.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].text(), CALL);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    // Plain HTTP on the HTTPS port gets no HTTP answer, and nothing reaches the node.
    let plain = tokio::time::timeout(LIMIT, async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::post("/api/v3")
            .header("host", "x")
            .body(Full::new(Bytes::from(CALL)))
            .unwrap();
        sender.send_request(request).await
    })
    .await
    .unwrap();
    assert!(plain.is_err(), "{plain:?}");

    // A renewed certificate in the same files: a reload serves it to new connections, and
    // the connection opened before keeps working.
    let second = write_certificate(dir.path());
    let reloaded = sentry_config(&[("v1", &agent_key)], &[("rpc", &["v1/rpc"], &extra)]);
    let report = sentry.handle.reload(&reloaded, &sentry_key).unwrap();
    assert_eq!(report.kept, 1);
    assert!(
        connect_tls(addr, &first).await.is_err(),
        "the old certificate is gone"
    );
    let mut renewed = connect_tls(addr, &second).await.unwrap();
    assert_eq!(
        send(&mut renewed, "POST", "/api/v3", &[], CALL)
            .await
            .status,
        200
    );
    assert_eq!(
        send(&mut sender, "POST", "/api/v3", &[], CALL).await.status,
        200
    );
    assert_eq!(node.requests().len(), 3);
    let text = sentry.handle.render_metrics();
    assert_eq!(
        metric(
            &text,
            "sentry_jsonrpc_requests_total",
            &[("route", "rpc"), ("outcome", "tls_handshake_failed")]
        ),
        Some(2.0),
        "the plain HTTP attempt and the client trusting the old certificate"
    );
}

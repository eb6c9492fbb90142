//! NATS connections as production runs them (`converge::nats::NatsConnect`):
//! a token, a user and password, an NKey, TLS with certificates made here
//! (server and client), several servers in one URL, a credentials file in
//! operator (JWT) mode; and wrong credentials
//! refused with an error that names the method and never the secret.

use std::path::PathBuf;

use converge::nats::{NatsConnect, NatsConnectError, Secret};
use converge_tests::NatsServer;

/// Connects and checks the connection works (a request round trip).
async fn works(c: &NatsConnect) {
    let client = c.connect().await.unwrap_or_else(|e| panic!("{e}"));
    client.flush().await.expect("flush");
}

fn refused(result: Result<async_nats::Client, NatsConnectError>, method: &str, secret: &str) {
    let err = match result {
        Ok(_) => panic!("connected with {method} though the server should refuse it"),
        Err(e) => e,
    };
    let shown = format!("{err} / {err:?}");
    assert!(
        matches!(err, NatsConnectError::Refused { .. }),
        "not a refusal: {shown}"
    );
    assert!(
        shown.contains(method),
        "the error does not name {method}: {shown}"
    );
    assert!(!err.is_retryable());
    if !secret.is_empty() {
        assert!(
            !shown.contains(secret),
            "the secret is in the error: {shown}"
        );
    }
}

#[tokio::test]
async fn a_token_is_sent_and_a_wrong_one_is_refused_without_echoing_it() {
    let server = NatsServer::start_with_config("authorization { token: \"s3cret-t0ken\" }").await;
    let mut c = NatsConnect::new(server.url());
    c.token = Some(Secret::new("s3cret-t0ken"));
    works(&c).await;
    c.token = Some(Secret::new("wr0ng-t0ken"));
    refused(c.connect().await, "the token", "wr0ng-t0ken");
    refused(
        NatsConnect::new(server.url()).connect().await,
        "an unauthenticated connection",
        "",
    );
}

#[tokio::test]
async fn a_user_and_password_are_sent_and_a_wrong_password_is_refused() {
    let server = NatsServer::start_with_config(
        "authorization { users = [ { user: alice, password: \"pa55-w0rd\" } ] }",
    )
    .await;
    let mut c = NatsConnect::new(server.url());
    c.user = Some("alice".into());
    c.password = Some(Secret::new("pa55-w0rd"));
    works(&c).await;
    c.password = Some(Secret::new("n0t-her-pa55"));
    refused(c.connect().await, "the user and password", "n0t-her-pa55");
}

#[tokio::test]
async fn an_nkey_seed_file_signs_in_and_another_key_is_refused() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .await;
    let dir = temp_dir();
    let seed = dir.join("user.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let mut c = NatsConnect::new(server.url());
    c.nkey = Some(seed.clone());
    works(&c).await;
    let other = nkeys::KeyPair::new_user();
    std::fs::write(&seed, other.seed().unwrap()).unwrap();
    refused(c.connect().await, "the NKey", &other.seed().unwrap());
    c.nkey = Some(dir.join("missing.nk"));
    let err = c.connect().await.expect_err("a missing seed file");
    assert!(
        matches!(err, NatsConnectError::File { .. }) && err.to_string().contains("missing.nk"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_with_a_ca_and_a_client_certificate_and_an_untrusted_server_is_named() {
    let dir = temp_dir();
    converge_tests::make_certificates(&dir, "client");
    let path = |f: &str| dir.join(f).display().to_string();
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    ))
    .await;
    let url = server.url().replace("nats://", "tls://");
    let mut c = NatsConnect::new(url.clone());
    c.tls_ca = Some(dir.join("ca.pem"));
    c.tls_cert = Some(dir.join("client.pem"));
    c.tls_key = Some(dir.join("client.key"));
    works(&c).await;
    // The server's certificate is not signed by a CA this client trusts.
    let mut untrusted = NatsConnect::new(url);
    untrusted.tls_cert = Some(dir.join("client.pem"));
    untrusted.tls_key = Some(dir.join("client.key"));
    let err = untrusted.connect().await.expect_err("an untrusted server");
    assert!(matches!(err, NatsConnectError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("--tlsca"), "{err}");
}

#[tokio::test]
async fn several_servers_in_one_url_and_a_dead_one_among_them() {
    let server = NatsServer::start().await;
    // Port 1 answers nothing: the client goes on to the live server.
    let c = NatsConnect::new(format!("nats://127.0.0.1:1,{}", server.url()));
    assert_eq!(c.server_addrs().unwrap().len(), 2);
    works(&c).await;
    let err = NatsConnect::new("nats://127.0.0.1:1")
        .connect()
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("nats-server -js"), "{err}");
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("converge-nats-auth-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A JWT for `claims` signed by `key`, as `nsc` makes them (nats-jwt makes
/// account and user JWTs, not the operator's).
fn operator_jwt(key: &nkeys::KeyPair) -> String {
    use data_encoding::BASE64URL_NOPAD;
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": iat,
        "iss": key.public_key(),
        "sub": key.public_key(),
        "name": "test-operator",
        "nats": { "type": "operator", "version": 2 },
    });
    let half = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature = key.sign(half.as_bytes()).unwrap();
    format!("{half}.{}", BASE64URL_NOPAD.encode(&signature))
}

/// A credentials file (user JWT and seed) as `nsc generate creds` writes it.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test]
async fn a_credentials_file_signs_in_and_one_from_an_unknown_account_is_refused() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let signing = nkeys::KeyPair::new_account();
    let account_jwt = nats_jwt::Token::new_account(account.public_key())
        .name("app")
        .add_signing_key(signing.public_key())
        .sign(&operator);
    // JetStream (the test servers run it) needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt::Token::new_account(system.public_key())
        .name("SYS")
        .sign(&operator);
    let server = NatsServer::start_with_config(&format!(
        "operator: {}\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
        operator_jwt(&operator),
        system.public_key(),
        system.public_key(),
        system_jwt,
        account.public_key(),
        account_jwt
    ))
    .await;
    let user = nkeys::KeyPair::new_user();
    let user_jwt = nats_jwt::Token::new_user(account.public_key(), user.public_key())
        .name("worker")
        .sign(&signing);
    let dir = temp_dir();
    let file = dir.join("worker.creds");
    std::fs::write(&file, creds(&user_jwt, &user.seed().unwrap())).unwrap();
    let mut c = NatsConnect::new(server.url());
    c.creds = Some(file.clone());
    works(&c).await;

    // A user of an account the server does not know.
    let stranger = nkeys::KeyPair::new_account();
    let other = nkeys::KeyPair::new_user();
    let other_jwt = nats_jwt::Token::new_user(stranger.public_key(), other.public_key())
        .name("stranger")
        .sign(&stranger);
    std::fs::write(&file, creds(&other_jwt, &other.seed().unwrap())).unwrap();
    refused(
        c.connect().await,
        "the credentials file",
        &other.seed().unwrap(),
    );
}

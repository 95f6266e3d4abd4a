//! A webhook endpoint on loopback for tests: records every request it gets
//! and answers each with the status the test scripted (200 once the script
//! runs out).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::within;

/// A request the endpoint got.
#[derive(Debug, Clone)]
pub struct Hook {
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Hook {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Whether the Standard Webhooks reference library verifies it with
    /// `secret`.
    pub fn verify(&self, secret: &str) -> Result<(), String> {
        let verifier = standardwebhooks::Webhook::new(secret).map_err(|error| error.to_string())?;
        verifier
            .verify(&self.body, &self.headers)
            .map_err(|error| error.to_string())
    }
}

/// The endpoint; stops when dropped.
pub struct WebhookReceiver {
    /// Where it listens: `http://127.0.0.1:<port>/hook`.
    pub url: String,
    answers: Arc<Mutex<VecDeque<u16>>>,
    received: mpsc::UnboundedReceiver<Hook>,
    stop: CancellationToken,
}

impl WebhookReceiver {
    /// Listens on an ephemeral loopback port, plain http://.
    pub async fn start() -> WebhookReceiver {
        WebhookReceiver::listen(None).await
    }

    /// Listens on an ephemeral loopback port, https://localhost, with a
    /// certificate of a CA of its own; returns that CA's certificate (PEM).
    pub async fn start_https() -> (WebhookReceiver, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "webhook test CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (WebhookReceiver::listen(Some(acceptor)).await, ca.pem())
    }

    async fn listen(tls: Option<tokio_rustls::TlsAcceptor>) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}/hook"),
            None => format!("http://127.0.0.1:{port}/hook"),
        };
        let answers: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let (sender, received) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let serving = (Arc::clone(&answers), stop.clone());
        tokio::spawn(async move {
            let (answers, stop) = serving;
            loop {
                let stream = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => return,
                    },
                };
                let answers = Arc::clone(&answers);
                let sender = sender.clone();
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let answers = Arc::clone(&answers);
                    let sender = sender.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let _ = sender.send(Hook {
                            headers: parts.headers,
                            body,
                        });
                        let status = answers.lock().unwrap().pop_front().unwrap_or(200);
                        let mut response = http::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        WebhookReceiver {
            url,
            answers,
            received,
            stop,
        }
    }

    /// Answers the next requests with `statuses`, in order.
    pub fn answer(&self, statuses: &[u16]) {
        self.answers.lock().unwrap().extend(statuses);
    }

    /// The next request the endpoint gets.
    pub async fn next(&mut self) -> Hook {
        within("a webhook request", self.received.recv())
            .await
            .expect("the endpoint stopped")
    }

    /// A request that came already, if any.
    pub fn try_next(&mut self) -> Option<Hook> {
        self.received.try_recv().ok()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

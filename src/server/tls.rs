//! TLS for the WebSocket listener (docs/DESIGN.md section 7, docs/PROTOCOL.md section 1): the
//! `tls_cert` / `tls_key` PEM files make a rustls acceptor (ring, no OpenSSL), and [`Stream`] is
//! what one connection reads and writes, the TCP socket itself or a TLS session over it.
//! A client that speaks plain HTTP (`ws://`) to a TLS port gets a plain-text HTTP 400 saying
//! so, instead of a TLS alert it cannot read.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, crypto::ring};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use super::config::{ServerConfig, TLS_BOTH_OR_NEITHER};
use crate::error::{Error, Result};

/// The acceptor for `cfg.tls_cert` / `cfg.tls_key`; `None` when TLS is off. Every problem
/// (one file without the other, unreadable file, no PEM certificate or key in it, a key that
/// does not match the certificate) is an error naming the file.
pub(crate) fn acceptor(cfg: &ServerConfig) -> Result<Option<TlsAcceptor>> {
    let (cert, key) = match (&cfg.tls_cert, &cfg.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c.as_path(), k.as_path()),
        _ => return Err(Error::Config(TLS_BOTH_OR_NEITHER.to_string())),
    };
    let certs = read_certs(cert)?;
    let key_der = read_key(key)?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            Error::Config(format!(
                "TLS: the key in {} does not go with the certificate in {}: {e}",
                key.display(),
                cert.display()
            ))
        })?;
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

/// The file of setting `what` (`tls_cert` or `tls_key`).
fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("{what} {}: cannot read it: {e}", path.display())))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |why: String| Error::Config(format!("tls_cert {}: {why}", path.display()));
    let pem = read_file("tls_cert", path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(bad("no PEM CERTIFICATE block in it".to_string()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_file("tls_key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        Error::Config(format!(
            "tls_key {}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        ))
    })
}

/// A connection's byte stream: the socket, or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why a TLS accept failed: the `refused_total` reason and a line for the debug log.
pub(crate) type Refusal = (&'static str, String);

/// The first byte of a TLS record carrying a handshake (the ClientHello), RFC 8446 5.1.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plain-HTTP client on the TLS port is told (HTTP 400, then close).
const PLAIN_TEXT: &str = "this server speaks TLS: connect with wss:// (not ws://)\n";

/// The TLS handshake on `tcp` (the caller bounds it by the handshake timeout). A client whose
/// first byte is not a TLS handshake record gets [`PLAIN_TEXT`] and is refused `not_tls`; a
/// failed handshake is refused `tls`.
pub(crate) async fn accept(
    acceptor: &TlsAcceptor,
    mut tcp: TcpStream,
) -> std::result::Result<Stream, Refusal> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] != TLS_HANDSHAKE => {
            answer_plain(&mut tcp).await;
            return Err(("not_tls", "plain-text request on the TLS port".to_string()));
        }
        Ok(1) => {}
        Ok(_) => return Err(("tls", "closed before the TLS handshake".to_string())),
        Err(e) => return Err(("tls", e.to_string())),
    }
    match acceptor.accept(tcp).await {
        Ok(s) => Ok(Stream::Tls(Box::new(s))),
        Err(e) => Err(("tls", format!("TLS handshake failed: {e}"))),
    }
}

/// Reads the request (so that closing does not reset the connection before the client has
/// read the answer), answers [`PLAIN_TEXT`] and closes, all within a second.
async fn answer_plain(tcp: &mut TcpStream) {
    let talk = async {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{PLAIN_TEXT}",
            PLAIN_TEXT.len()
        );
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        // Wait for the client to close its side (or the deadline below).
        while tcp.read(&mut buf).await? > 0 {}
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), talk).await;
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

//! The Storage SCP: associations, AE checks, presentation contexts, C-ECHO and C-STORE.
//!
//! Each association runs on its own thread, up to `max_associations`; past that a request
//! gets a transient A-ASSOCIATE-RJ (local limit exceeded) so the sender retries. An
//! instance is answered with success only after the spool has made it durable.

use crate::config::ScpConfig;
use crate::dimse::{self, status, Command};
use crate::instance::InstanceMeta;
use crate::spool::{Received, Spool, StoreOutcome, Stored};
use crossbeam_channel::Sender;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::mem::InMemDicomObject;
use dicom_object::FileMetaTableBuilder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::server::{AccessControl, DefaultNegotiation, ServerAssociationOptions};
use dicom_ul::association::Association;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType, PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociation};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Implementation Class UID of scout (a UUID-derived 2.25 root) and its version name.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.196713926281735734190311298651428932357";
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("SCOUT_", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum ScpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

/// The rustls server configuration from PEM files (ring provider, TLS 1.2 and 1.3).
pub fn tls_server_config(tls: &crate::config::TlsConfig) -> Result<rustls::ServerConfig, ScpError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let e = |what: &std::path::Path, d: String| ScpError::Tls(format!("{}: {d}", what.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.certificate)
        .map_err(|x| e(&tls.certificate, x.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|x| e(&tls.certificate, x.to_string()))?;
    if certs.is_empty() {
        return Err(e(&tls.certificate, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.private_key)
        .map_err(|x| e(&tls.private_key, x.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|x| ScpError::Tls(x.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|x| e(ca, x.to_string()))? {
                roots
                    .add(c.map_err(|x| e(ca, x.to_string()))?)
                    .map_err(|x| e(ca, x.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|x| e(ca, x.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|x| e(&tls.certificate, x.to_string()))
}

/// Called AE must be ours; calling AE must be on the allow-list when one is configured.
#[derive(Debug, Clone)]
struct AeCheck {
    allowed_calling: Vec<String>,
}

impl AccessControl for AeCheck {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let calling = calling_ae_title.trim();
        if !self.allowed_calling.is_empty()
            && !self.allowed_calling.iter().any(|a| a.trim() == calling)
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

type Options = ServerAssociationOptions<'static, AeCheck, DefaultNegotiation>;

/// A transport an association runs on: plain TCP or TLS over TCP.
trait Stream: std::io::Read + std::io::Write + dicom_ul::association::CloseSocket {}
impl<T: std::io::Read + std::io::Write + dicom_ul::association::CloseSocket> Stream for T {}

/// A running SCP; dropping it does not stop it, call [`ScpHandle::stop`].
pub struct ScpHandle {
    pub local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScpHandle {
    /// Stops accepting; associations in flight finish on their own threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds the configured address and serves in a background thread.
pub fn start(
    config: &ScpConfig,
    spool: Arc<Spool>,
    received: Sender<Received>,
) -> Result<ScpHandle, ScpError> {
    let addr = format!("{}:{}", config.bind, config.port);
    let listener = TcpListener::bind(&addr).map_err(|source| ScpError::Bind {
        addr: addr.clone(),
        source,
    })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ScpError::Bind { addr, source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let (finishing, to_finish) = crossbeam_channel::bounded::<Finishing>(FINISH_QUEUE);
    let finisher_spool = spool.clone();
    std::thread::Builder::new()
        .name("spool-finish".into())
        .spawn(move || {
            for f in to_finish {
                finish(&finisher_spool, &received, f);
            }
        })
        .map_err(|source| ScpError::Bind {
            addr: local_addr.to_string(),
            source,
        })?;
    let mut options = build_options(config);
    let tls = config.tls.is_some();
    if let Some(t) = &config.tls {
        options = options.tls_config(tls_server_config(t)?);
    }
    let ctx = Arc::new(Context {
        tls,
        options,
        config: config.clone(),
        spool,
        finishing,
        active: AtomicUsize::new(0),
    });
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("scp-accept".into())
        .spawn(move || accept_loop(listener, ctx, stop2))
        .map_err(|source| ScpError::Bind {
            addr: local_addr.to_string(),
            source,
        })?;
    log::info!(
        "scp: {} listening on {local_addr}{} (max {} associations, max PDU {})",
        config.ae_title,
        if tls { " with TLS" } else { "" },
        config.max_associations,
        config.max_pdu_length
    );
    Ok(ScpHandle {
        local_addr,
        stop,
        thread: Some(thread),
    })
}

struct Context {
    /// Associations are TLS-protected (`options` holds the rustls configuration).
    tls: bool,
    options: Options,
    config: ScpConfig,
    spool: Arc<Spool>,
    /// Acknowledged instances whose files are written by the finisher thread, so the
    /// association can read the next request meanwhile.
    finishing: Sender<Finishing>,
    active: AtomicUsize,
}

struct Finishing {
    calling: String,
    stored: Stored,
    meta: InstanceMeta,
    dataset: Vec<u8>,
}

/// Instances acknowledged but not yet finished; a full queue makes associations wait.
const FINISH_QUEUE: usize = 16;

fn build_options(config: &ScpConfig) -> Options {
    let mut o = ServerAssociationOptions::new()
        .ae_access_control(AeCheck {
            allowed_calling: config.allowed_calling_ae_titles.clone(),
        })
        .ae_title(config.ae_title.clone())
        .max_pdu_length(config.max_pdu_length)
        .read_timeout(config.read_timeout())
        .write_timeout(config.write_timeout())
        .with_abstract_syntax(dimse::VERIFICATION_SOP_CLASS);
    for uid in &config.sop_classes {
        o = o.with_abstract_syntax(uid.clone());
    }
    for ts in &config.transfer_syntaxes {
        o = o.with_transfer_syntax(ts.clone());
    }
    o
}

fn accept_loop(listener: TcpListener, ctx: Arc<Context>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::error!("scp: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let _ = stream.set_nodelay(true);
        let busy = ctx.active.fetch_add(1, Ordering::SeqCst) >= ctx.config.max_associations;
        let ctx2 = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("scp-{peer}"))
            .spawn(move || {
                if busy {
                    reject_busy(stream, &peer, &ctx2.config);
                } else {
                    serve_association(stream, &peer, &ctx2);
                }
                ctx2.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            log::error!("scp: cannot start a thread for {e}");
        }
    }
}

/// Reads the A-ASSOCIATE-RQ and answers a transient rejection, so a sender over our
/// association limit knows to retry later.
fn reject_busy(mut stream: TcpStream, peer: &str, config: &ScpConfig) {
    if config.tls.is_some() {
        // No TLS session to carry an A-ASSOCIATE-RJ: closing makes the peer retry.
        crate::metrics::inc(&crate::metrics::METRICS.associations_rejected);
        log::warn!(
            "scp: closed connection from {peer}: {} associations already active",
            config.max_associations
        );
        return;
    }
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    // Consume the request PDU (6-byte header, then its length) before answering.
    let mut header = [0u8; 6];
    if stream.read_exact(&mut header).is_ok() {
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as u64;
        let _ = std::io::copy(
            &mut (&mut stream).take(len.min(1 << 20)),
            &mut std::io::sink(),
        );
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::new();
    if dicom_ul::write_pdu(&mut out, &rj).is_ok() {
        let _ = stream.write_all(&out);
    }
    crate::metrics::inc(&crate::metrics::METRICS.associations_rejected);
    log::warn!(
        "scp: rejected association from {peer}: {} associations already active",
        config.max_associations
    );
}

/// Why a connection was closed before dicom-ul saw it.
#[derive(Debug, thiserror::Error)]
enum Opening {
    #[error("closed before any request")]
    Closed,
    #[error("no complete request within {0:?}")]
    TimedOut(Duration),
    #[error("TLS record on this plain DICOM port (configure [scp.tls] or connect without TLS)")]
    TlsOnPlainPort,
    #[error("not a TLS client on this TLS port")]
    PlainOnTlsPort,
    #[error("{0}")]
    Io(std::io::Error),
}

/// Waits, without consuming anything, until the connection's opening bytes are there:
/// the first byte of an A-ASSOCIATE-RQ, or the whole TLS ClientHello in TLS mode.
///
/// dicom-ul 0.10.1 with `sync-tls` spins forever at full CPU when a connection ends too
/// early: on a plain port it re-checks the bytes read so far for a TLS ClientHello and
/// keeps asking an exhausted buffer for more; on a TLS port its acceptor keeps reading a
/// closed socket. One port scan or TCP health check would pin a core and hold an
/// association slot for good, so such connections never reach it.
fn await_opening(stream: &TcpStream, tls: bool, timeout: Duration) -> Result<(), Opening> {
    let timeout = timeout.max(Duration::from_secs(1));
    let _ = stream.set_read_timeout(Some(timeout));
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; if tls { 1 << 16 } else { 1 }];
    loop {
        let n = match stream.peek(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Opening::TimedOut(timeout))
            }
            Err(e) => return Err(Opening::Io(e)),
        };
        if n == 0 {
            return Err(Opening::Closed);
        }
        if !tls {
            // Any TLS record type (PDU types are 0x01–0x07) would reach the spinning check.
            return match buf[0] {
                0x14..=0x17 => Err(Opening::TlsOnPlainPort),
                _ => Ok(()),
            };
        }
        match client_hello_complete(&buf[..n]) {
            None => return Err(Opening::PlainOnTlsPort),
            Some(true) => return Ok(()),
            Some(false) if n == buf.len() => return Ok(()),
            Some(false) => {}
        }
        // Part of a ClientHello: peek returns at once while any byte is unread, so wait
        // for the rest instead of spinning.
        if Instant::now() >= deadline {
            return Err(Opening::TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// None when `bytes` do not start like a TLS handshake record; otherwise whether they
/// hold a whole handshake message (the ClientHello), which may span several records.
fn client_hello_complete(bytes: &[u8]) -> Option<bool> {
    const HANDSHAKE: u8 = 0x16;
    match bytes {
        [] => return Some(false),
        [t, ..] if *t != HANDSHAKE => return None,
        [_, major, ..] if *major != 0x03 => return None,
        _ => {}
    }
    let mut payload = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 5 {
        if bytes[at] != HANDSHAKE {
            return None;
        }
        let len = u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]) as usize;
        let end = (at + 5 + len).min(bytes.len());
        payload.extend_from_slice(&bytes[at + 5..end]);
        if payload.len() >= 4 {
            let message = u32::from_be_bytes([0, payload[1], payload[2], payload[3]]) as usize;
            if payload.len() >= 4 + message {
                return Some(true);
            }
        }
        if end < at + 5 + len {
            break;
        }
        at = end;
    }
    Some(false)
}

/// What the association is in the middle of receiving.
enum State {
    Idle,
    /// Command fragments so far (a command set may span PDVs).
    Command(Vec<u8>),
    /// A C-STORE command is parsed; data set fragments follow.
    Data {
        pc_id: u8,
        cmd: Command,
        buf: Vec<u8>,
        overflow: bool,
    },
}

#[derive(Default)]
struct Counters {
    stored: usize,
    failed: usize,
    echoes: usize,
    bytes: u64,
}

fn serve_association(stream: TcpStream, peer: &str, ctx: &Context) {
    let started = Instant::now();
    let refused = |e: &dyn std::fmt::Display| {
        crate::metrics::inc(&crate::metrics::METRICS.associations_rejected);
        log::warn!("scp: association from {peer} not established: {e}");
    };
    match await_opening(&stream, ctx.tls, ctx.config.read_timeout()) {
        Ok(()) => {}
        Err(Opening::Closed) => {
            // Port scanners and TCP health checks: nothing to answer.
            log::debug!("scp: connection from {peer} closed before any request");
            return;
        }
        Err(e) => return refused(&e),
    }
    if ctx.tls {
        match ctx.options.establish_tls(stream) {
            Ok(a) => serve_established(a, peer, ctx, started),
            Err(e) => refused(&e),
        }
    } else {
        match ctx.options.establish(stream) {
            Ok(a) => serve_established(a, peer, ctx, started),
            Err(e) => refused(&e),
        }
    }
}

fn serve_established<S: Stream>(
    mut assoc: ServerAssociation<S>,
    peer: &str,
    ctx: &Context,
    started: Instant,
) {
    crate::metrics::inc(&crate::metrics::METRICS.associations);
    let calling = assoc.peer_ae_title().trim().to_string();
    let accepted = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .count();
    log::info!(
        "scp: association from {calling}@{peer} to {}: {accepted}/{} presentation contexts accepted, peer max PDU {}",
        assoc.called_ae_title().trim(),
        assoc.presentation_contexts().len(),
        assoc.requestor_max_pdu_length()
    );
    let mut counters = Counters::default();
    let end = run_association(&mut assoc, &calling, ctx, &mut counters);
    log::info!(
        "scp: association from {calling}@{peer} ended ({end}) after {:.2}s: {} stored, {} failed, {} echoes, {} bytes",
        started.elapsed().as_secs_f64(),
        counters.stored,
        counters.failed,
        counters.echoes,
        counters.bytes
    );
}

fn run_association<S: Stream>(
    assoc: &mut ServerAssociation<S>,
    calling: &str,
    ctx: &Context,
    counters: &mut Counters,
) -> &'static str {
    let mut state = State::Idle;
    loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => {
                log::warn!("scp: {calling}: receive failed: {e}");
                return "connection error";
            }
        };
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    match on_pdv(assoc, calling, ctx, counters, state, pdv) {
                        Ok(s) => state = s,
                        Err(reason) => {
                            log::warn!("scp: {calling}: protocol error, aborting: {reason}");
                            abort(assoc);
                            return "aborted by us";
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                if !matches!(state, State::Idle) {
                    log::warn!("scp: {calling}: release requested in the middle of a message");
                }
                if let Err(e) = assoc.send(&Pdu::ReleaseRP) {
                    log::warn!("scp: {calling}: cannot send A-RELEASE-RP: {e}");
                }
                return "released";
            }
            Pdu::AbortRQ { source } => {
                log::warn!("scp: {calling}: peer aborted ({source:?})");
                return "aborted by peer";
            }
            other => {
                log::warn!("scp: {calling}: unexpected {}", other.short_description());
                abort(assoc);
                return "aborted by us";
            }
        }
    }
}

fn abort<S: Stream>(assoc: &mut ServerAssociation<S>) {
    let _ = assoc.send(&Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::UnexpectedPdu),
    });
}

fn send_command<S: Stream>(
    assoc: &mut ServerAssociation<S>,
    pc_id: u8,
    data: Vec<u8>,
) -> Result<(), String> {
    assoc
        .send(&dimse::command_pdu(pc_id, data))
        .map_err(|e| format!("cannot send response: {e}"))
}

fn on_pdv<S: Stream>(
    assoc: &mut ServerAssociation<S>,
    calling: &str,
    ctx: &Context,
    counters: &mut Counters,
    state: State,
    mut pdv: PDataValue,
) -> Result<State, String> {
    let pc_accepted = assoc.presentation_contexts().iter().any(|pc| {
        pc.id == pdv.presentation_context_id
            && pc.reason == PresentationContextResultReason::Acceptance
    });
    if !pc_accepted {
        return Err(format!(
            "data on presentation context {} which was not accepted",
            pdv.presentation_context_id
        ));
    }
    match (state, pdv.value_type) {
        (State::Idle, PDataValueType::Command) if pdv.is_last => {
            on_command(assoc, ctx, counters, pdv.presentation_context_id, &pdv.data)
        }
        // A command set split over several PDVs.
        (State::Idle, PDataValueType::Command) => Ok(State::Command(pdv.data)),
        (State::Command(mut buf), PDataValueType::Command) => {
            buf.append(&mut pdv.data);
            if pdv.is_last {
                on_command(assoc, ctx, counters, pdv.presentation_context_id, &buf)
            } else {
                Ok(State::Command(buf))
            }
        }
        (
            State::Data {
                pc_id,
                cmd,
                mut buf,
                mut overflow,
            },
            PDataValueType::Data,
        ) => {
            if pc_id != pdv.presentation_context_id {
                return Err(format!(
                    "data set fragment on context {} while receiving on {pc_id}",
                    pdv.presentation_context_id
                ));
            }
            if !overflow && (buf.len() + pdv.data.len()) as u64 > ctx.config.max_instance_bytes {
                overflow = true;
                buf = Vec::new();
            }
            if !overflow {
                if buf.is_empty() {
                    buf = pdv.data;
                } else {
                    buf.append(&mut pdv.data);
                }
            }
            if !pdv.is_last {
                return Ok(State::Data {
                    pc_id,
                    cmd,
                    buf,
                    overflow,
                });
            }
            let result = if overflow {
                Err((
                    status::OUT_OF_RESOURCES,
                    Some(format!(
                        "instance larger than {} bytes",
                        ctx.config.max_instance_bytes
                    )),
                ))
            } else {
                counters.bytes += buf.len() as u64;
                store(assoc, calling, ctx, pc_id, &cmd, &buf)
            };
            let (st, comment, durable) = match result {
                Ok(d) => (status::SUCCESS, None, Some(d)),
                Err((st, comment)) => (st, comment, None),
            };
            if st == status::SUCCESS {
                counters.stored += 1;
                crate::metrics::inc(&crate::metrics::METRICS.instances_received);
            } else {
                counters.failed += 1;
                crate::metrics::inc(&crate::metrics::METRICS.instances_rejected);
                log::warn!(
                    "scp: {calling}: C-STORE of {} answered {st:#06x}: {}",
                    cmd.affected_sop_instance_uid.as_deref().unwrap_or("?"),
                    comment.as_deref().unwrap_or("")
                );
            }
            let rsp = dimse::store_rsp(
                cmd.message_id,
                cmd.affected_sop_class_uid.as_deref().unwrap_or(""),
                cmd.affected_sop_instance_uid.as_deref().unwrap_or(""),
                st,
                comment.as_deref(),
            )
            .map_err(|e| e.to_string());
            let sent = rsp.and_then(|rsp| send_command(assoc, pc_id, rsp));
            // Finished whether or not the answer got through: it is durable either way.
            if let Some((stored, meta)) = durable {
                let f = Finishing {
                    calling: calling.to_string(),
                    stored,
                    meta,
                    dataset: buf,
                };
                if ctx.finishing.send(f).is_err() {
                    log::error!(
                        "scp: finisher has stopped; instance stays in the journal for recovery"
                    );
                }
            }
            sent?;
            Ok(State::Idle)
        }
        (State::Data { .. }, PDataValueType::Command) => {
            Err("command fragment while a data set was expected".into())
        }
        (State::Idle | State::Command(_), PDataValueType::Data) => {
            Err("data set fragment without a command".into())
        }
    }
}

fn on_command<S: Stream>(
    assoc: &mut ServerAssociation<S>,
    ctx: &Context,
    counters: &mut Counters,
    pc_id: u8,
    bytes: &[u8],
) -> Result<State, String> {
    let cmd = Command::parse(bytes).map_err(|e| e.to_string())?;
    match cmd.field {
        dimse::C_ECHO_RQ => {
            counters.echoes += 1;
            crate::metrics::inc(&crate::metrics::METRICS.echoes);
            send_command(
                assoc,
                pc_id,
                dimse::echo_rsp(cmd.message_id).map_err(|e| e.to_string())?,
            )?;
            Ok(State::Idle)
        }
        dimse::C_STORE_RQ if cmd.has_data_set => {
            let capacity = ctx.config.max_instance_bytes.min(1 << 20) as usize;
            Ok(State::Data {
                pc_id,
                cmd,
                buf: Vec::with_capacity(capacity),
                overflow: false,
            })
        }
        field if !cmd.has_data_set => {
            send_command(
                assoc,
                pc_id,
                dimse::unrecognized_rsp(field, cmd.message_id).map_err(|e| e.to_string())?,
            )?;
            Ok(State::Idle)
        }
        field => Err(format!(
            "unsupported DIMSE command {field:#06x} with a data set"
        )),
    }
}

/// A refusal: the DIMSE status to answer and why.
type Refusal = (u16, Option<String>);

/// Validates one instance and makes it durable; the caller acknowledges it, then
/// finishes it with [`Spool::finish`] and hands it on.
fn store<S: Stream>(
    assoc: &ServerAssociation<S>,
    calling: &str,
    ctx: &Context,
    pc_id: u8,
    cmd: &Command,
    dataset: &[u8],
) -> Result<(Stored, InstanceMeta), Refusal> {
    let Some(pc) = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.id == pc_id)
    else {
        return Err((
            status::CANNOT_UNDERSTAND,
            Some("unknown presentation context".into()),
        ));
    };
    let (Some(affected_class), Some(affected_instance)) =
        (&cmd.affected_sop_class_uid, &cmd.affected_sop_instance_uid)
    else {
        return Err((
            status::CANNOT_UNDERSTAND,
            Some("C-STORE-RQ without Affected SOP Class/Instance UID".into()),
        ));
    };
    if affected_class != pc.abstract_syntax.trim_end_matches('\0')
        || !ctx.config.sop_classes.contains(affected_class)
    {
        return Err((
            status::SOP_CLASS_NOT_SUPPORTED,
            Some(format!(
                "SOP class {affected_class} not accepted on this context"
            )),
        ));
    }
    let Some(ts) = TransferSyntaxRegistry.get(&pc.transfer_syntax) else {
        return Err((
            status::CANNOT_UNDERSTAND,
            Some(format!("transfer syntax {} unknown", pc.transfer_syntax)),
        ));
    };
    let obj = match InMemDicomObject::read_dataset_with_ts(dataset, ts) {
        Ok(o) => o,
        Err(e) => {
            return Err((
                status::CANNOT_UNDERSTAND,
                Some(format!("data set cannot be parsed: {e}")),
            ))
        }
    };
    let meta = match InstanceMeta::from_object(&obj) {
        Ok(m) => m,
        Err(e) => {
            return Err((
                status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                Some(e.to_string()),
            ))
        }
    };
    if &meta.sop_instance_uid != affected_instance || &meta.sop_class_uid != affected_class {
        return Err((
            status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            Some("SOP Class/Instance UID in data set differ from the command".into()),
        ));
    }
    if is_image_storage(affected_class) && !has_pixel_data(&obj) {
        return Err((
            status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            Some("image without Pixel Data (truncated?)".into()),
        ));
    }
    let file_meta = match FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(affected_class.as_str())
        .media_storage_sop_instance_uid(affected_instance.as_str())
        .transfer_syntax(ts.uid())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .source_application_entity_title(calling)
        .receiving_application_entity_title(ctx.config.ae_title.as_str())
        .build()
    {
        Ok(m) => m,
        Err(e) => return Err((status::CANNOT_UNDERSTAND, Some(format!("file meta: {e}")))),
    };
    match ctx.spool.store(&meta, &file_meta, dataset) {
        Ok(stored) => Ok((stored, meta)),
        Err(e) => {
            if e.is_out_of_resources() {
                log::warn!("scp: {calling}: {e}");
            } else {
                log::error!("scp: {calling}: {e}");
            }
            Err((status::OUT_OF_RESOURCES, Some(e.to_string())))
        }
    }
}

/// After the acknowledgement: writes a journalled instance's file and hands it on.
fn finish(spool: &Spool, received: &Sender<Received>, f: Finishing) {
    let outcome = f.stored.outcome;
    match spool.finish(f.stored, &f.dataset) {
        Ok(path) => {
            log::debug!("scp: {}: {outcome:?} {}", f.calling, path.display());
            if outcome != StoreOutcome::DuplicateIgnored {
                // Blocks when series assembly lags: back-pressure on the sender, never a drop.
                if received.send(Received { path, meta: f.meta }).is_err() {
                    log::error!("scp: series assembly has stopped; instance stays in the spool for recovery");
                }
            }
        }
        // Durable in the journal already: the next start writes it and hands it on.
        Err(e) => log::error!(
            "scp: {}: acknowledged instance left in the journal: {e}",
            f.calling
        ),
    }
}

/// Every storage class we accept carries pixel data except the structured reports.
fn is_image_storage(sop_class: &str) -> bool {
    !sop_class.starts_with("1.2.840.10008.5.1.4.1.1.88.")
}

fn has_pixel_data(obj: &InMemDicomObject) -> bool {
    const PIXEL_TAGS: [Tag; 3] = [
        tags::PIXEL_DATA,
        tags::FLOAT_PIXEL_DATA,
        tags::DOUBLE_FLOAT_PIXEL_DATA,
    ];
    PIXEL_TAGS.iter().any(|t| obj.get(*t).is_some())
}

#[cfg(test)]
mod tests {
    use super::client_hello_complete;

    #[test]
    fn client_hello_detection() {
        // A-ASSOCIATE-RQ header: not TLS.
        assert_eq!(client_hello_complete(&[0x01, 0x00, 0, 0, 0, 0xcd]), None);
        assert_eq!(client_hello_complete(&[0x16, 0x01]), None);
        assert_eq!(client_hello_complete(&[]), Some(false));
        assert_eq!(client_hello_complete(&[0x16]), Some(false));
        assert_eq!(client_hello_complete(&[0x16, 0x03, 0x01]), Some(false));
        // One record holding a 6-byte handshake message.
        let hello = [
            0x16, 0x03, 0x01, 0x00, 0x0a, 0x01, 0x00, 0x00, 0x06, 1, 2, 3, 4, 5, 6,
        ];
        assert_eq!(client_hello_complete(&hello), Some(true));
        assert_eq!(client_hello_complete(&hello[..14]), Some(false));
        // The same message split over two records.
        let split = [
            0x16, 0x03, 0x01, 0x00, 0x06, 0x01, 0x00, 0x00, 0x06, 1, 2, //
            0x16, 0x03, 0x01, 0x00, 0x04, 3, 4, 5, 6,
        ];
        assert_eq!(client_hello_complete(&split), Some(true));
        assert_eq!(client_hello_complete(&split[..18]), Some(false));
        assert_eq!(client_hello_complete(&split[..11]), Some(false));
    }
}

//! The SCU side: C-ECHO and C-STORE to a remote AE. Used by `scout echo` / `scout send`
//! for manual testing and by the result sender.

use crate::dimse::{self, Command};
use dicom_object::FileMetaTable;
use dicom_ul::association::client::ClientAssociation;
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("association with {peer} failed: {source}")]
    Associate {
        peer: String,
        source: Box<dicom_ul::association::Error>,
    },
    #[error("{peer}: {what}: {detail}")]
    Exchange {
        peer: String,
        what: &'static str,
        detail: String,
    },
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
}

/// A remote application entity.
#[derive(Debug, Clone)]
pub struct Peer {
    pub host: String,
    pub port: u16,
    pub called_ae_title: String,
    pub calling_ae_title: String,
    pub timeout: Duration,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.called_ae_title, self.host, self.port)
    }
}

/// One instance ready to send: the data set exactly as encoded in its transfer syntax.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub dataset: Vec<u8>,
}

impl Outgoing {
    /// Reads a Part-10 file without re-encoding its data set.
    pub fn from_file(path: &Path) -> Result<Outgoing, ScuError> {
        let err = |detail: String| ScuError::File {
            path: path.to_path_buf(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
            return Err(err("not a DICOM Part-10 file (no DICM preamble)".into()));
        }
        let meta = FileMetaTable::from_reader(&bytes[128..]).map_err(|e| err(e.to_string()))?;
        // Preamble, magic, then the group length element (12 bytes) and the group itself.
        let start = 132 + 12 + meta.information_group_length as usize;
        if start > bytes.len() {
            return Err(err("file meta group runs past the end of the file".into()));
        }
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
        Ok(Outgoing {
            sop_class_uid: trim(meta.media_storage_sop_class_uid()),
            sop_instance_uid: trim(meta.media_storage_sop_instance_uid()),
            transfer_syntax_uid: trim(meta.transfer_syntax()),
            dataset: bytes[start..].to_vec(),
        })
    }
}

fn options(peer: &Peer) -> ClientAssociationOptions<'static> {
    ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae_title.clone())
        .called_ae_title(peer.called_ae_title.clone())
        .read_timeout(peer.timeout)
        .write_timeout(peer.timeout)
        .connection_timeout(peer.timeout)
}

fn connect(
    peer: &Peer,
    options: ClientAssociationOptions<'static>,
) -> Result<ClientAssociation<TcpStream>, ScuError> {
    options
        .establish((peer.host.as_str(), peer.port))
        .map_err(|e| ScuError::Associate {
            peer: peer.to_string(),
            source: Box::new(e),
        })
}

fn exchange<'a>(peer: &'a Peer, what: &'static str) -> impl Fn(String) -> ScuError + 'a {
    move |detail| ScuError::Exchange {
        peer: peer.to_string(),
        what,
        detail,
    }
}

/// Reads PDUs until a complete command set arrives.
fn receive_command(assoc: &mut ClientAssociation<TcpStream>) -> Result<Command, String> {
    let mut buf = Vec::new();
    loop {
        match assoc.receive().map_err(|e| e.to_string())? {
            Pdu::PData { data } => {
                for mut pdv in data {
                    if pdv.value_type != PDataValueType::Command {
                        return Err("unexpected data set in a response".into());
                    }
                    buf.append(&mut pdv.data);
                    if pdv.is_last {
                        return Command::parse(&buf).map_err(|e| e.to_string());
                    }
                }
            }
            Pdu::AbortRQ { source } => return Err(format!("peer aborted: {source:?}")),
            other => return Err(format!("unexpected {}", other.short_description())),
        }
    }
}

fn send_command(
    assoc: &mut ClientAssociation<TcpStream>,
    pc_id: u8,
    data: Vec<u8>,
) -> Result<(), String> {
    assoc
        .send(&dimse::command_pdu(pc_id, data))
        .map_err(|e| e.to_string())
}

/// C-ECHO; Ok when the peer answers success.
pub fn echo(peer: &Peer) -> Result<(), ScuError> {
    let mut assoc = connect(
        peer,
        options(peer).with_abstract_syntax(dimse::VERIFICATION_SOP_CLASS),
    )?;
    let pc_id = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| pc.id)
        .ok_or_else(|| exchange(peer, "C-ECHO")("Verification was not accepted".into()))?;
    let rq = dimse::echo_rq(1).map_err(|e| exchange(peer, "C-ECHO")(e.to_string()))?;
    send_command(&mut assoc, pc_id, rq).map_err(exchange(peer, "C-ECHO"))?;
    let rsp = receive_command(&mut assoc).map_err(exchange(peer, "C-ECHO"))?;
    let _ = assoc.release();
    match rsp.status {
        Some(0) if rsp.message_id == 1 => Ok(()),
        s => Err(exchange(peer, "C-ECHO")(format!(
            "status {s:?}, message id {}",
            rsp.message_id
        ))),
    }
}

/// The peer's answer to one C-STORE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreResult {
    pub sop_instance_uid: String,
    /// None when no presentation context for its SOP class / transfer syntax was accepted.
    pub status: Option<u16>,
    pub error_comment: Option<String>,
}

/// Sends every instance on one association, each in its own transfer syntax.
pub fn store(peer: &Peer, items: &[Outgoing]) -> Result<Vec<StoreResult>, ScuError> {
    store_paced(peer, items, Duration::ZERO).map(|(r, _)| r)
}

/// `store` with a pause of `gap` before every instance but the first, like a scanner
/// sending images as they are reconstructed. Also returns when the last response came.
pub fn store_paced(
    peer: &Peer,
    items: &[Outgoing],
    gap: Duration,
) -> Result<(Vec<StoreResult>, std::time::Instant), ScuError> {
    let mut contexts: Vec<(String, String)> = Vec::new();
    for it in items {
        let key = (it.sop_class_uid.clone(), it.transfer_syntax_uid.clone());
        if !contexts.contains(&key) {
            contexts.push(key);
        }
    }
    if contexts.len() > 128 {
        return Err(exchange(peer, "C-STORE")(
            "more than 128 SOP class/transfer syntax pairs".into(),
        ));
    }
    let mut opts = options(peer);
    for (class, ts) in &contexts {
        opts = opts.with_presentation_context(class.clone(), vec![ts.clone()]);
    }
    let mut assoc = connect(peer, opts)?;
    let mut results = Vec::with_capacity(items.len());
    let mut last = std::time::Instant::now();
    for (i, it) in items.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        let pc_id = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax == it.sop_class_uid
                    && pc.transfer_syntax.trim_end_matches('\0') == it.transfer_syntax_uid
            })
            .map(|pc| pc.id);
        let Some(pc_id) = pc_id else {
            results.push(StoreResult {
                sop_instance_uid: it.sop_instance_uid.clone(),
                status: None,
                error_comment: None,
            });
            continue;
        };
        let message_id = (i % 0xFFFF) as u16 + 1;
        let rq = dimse::store_rq(message_id, &it.sop_class_uid, &it.sop_instance_uid)
            .map_err(|e| exchange(peer, "C-STORE")(e.to_string()))?;
        send_command(&mut assoc, pc_id, rq).map_err(exchange(peer, "C-STORE"))?;
        {
            let mut w = assoc.send_pdata(pc_id);
            w.write_all(&it.dataset)
                .map_err(|e| exchange(peer, "C-STORE")(e.to_string()))?;
            w.finish()
                .map_err(|e| exchange(peer, "C-STORE")(e.to_string()))?;
        }
        let rsp = receive_command(&mut assoc).map_err(exchange(peer, "C-STORE"))?;
        if rsp.message_id != message_id {
            return Err(exchange(peer, "C-STORE")(format!(
                "response to message {} while waiting for {message_id}",
                rsp.message_id
            )));
        }
        last = std::time::Instant::now();
        results.push(StoreResult {
            sop_instance_uid: it.sop_instance_uid.clone(),
            status: rsp.status,
            error_comment: rsp.error_comment,
        });
    }
    let _ = assoc.release();
    Ok((results, last))
}

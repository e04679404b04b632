//! DIMSE command sets (PS3.7): the C-ECHO and C-STORE requests and responses that the SCP
//! answers and the SCU sends. Command sets are always Implicit VR Little Endian.

use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
/// Command Data Set Type value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;
pub const VERIFICATION_SOP_CLASS: &str = "1.2.840.10008.1.1";

/// DIMSE status codes used by the SCP (PS3.4 Annex B.2.3, PS3.7 Annex C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

#[derive(Debug, thiserror::Error)]
pub enum DimseError {
    #[error("command set cannot be parsed: {0}")]
    Parse(String),
    #[error("command set lacks {0}")]
    Missing(&'static str),
    #[error("cannot encode command set: {0}")]
    Encode(String),
}

/// A parsed command set, reduced to what this agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub field: u16,
    /// Message ID for requests, Message ID Being Responded To for responses.
    pub message_id: u16,
    pub affected_sop_class_uid: Option<String>,
    pub affected_sop_instance_uid: Option<String>,
    pub has_data_set: bool,
    /// Only in responses.
    pub status: Option<u16>,
    pub error_comment: Option<String>,
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

fn u16_of(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<u16> {
    obj.get(tag)?.to_int::<u16>().ok()
}

impl Command {
    pub fn parse(bytes: &[u8]) -> Result<Command, DimseError> {
        let obj =
            InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .map_err(|e| DimseError::Parse(e.to_string()))?;
        let field =
            u16_of(&obj, tags::COMMAND_FIELD).ok_or(DimseError::Missing("Command Field"))?;
        let is_response = field & 0x8000 != 0;
        let message_id = if is_response {
            u16_of(&obj, tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .ok_or(DimseError::Missing("Message ID Being Responded To"))?
        } else {
            u16_of(&obj, tags::MESSAGE_ID).ok_or(DimseError::Missing("Message ID"))?
        };
        let data_set_type = u16_of(&obj, tags::COMMAND_DATA_SET_TYPE)
            .ok_or(DimseError::Missing("Command Data Set Type"))?;
        Ok(Command {
            field,
            message_id,
            affected_sop_class_uid: text(&obj, tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: text(&obj, tags::AFFECTED_SOP_INSTANCE_UID),
            has_data_set: data_set_type != NO_DATA_SET,
            status: is_response.then(|| u16_of(&obj, tags::STATUS)).flatten(),
            error_comment: text(&obj, tags::ERROR_COMMENT),
        })
    }
}

fn encode(elements: Vec<DataElement<InMemDicomObject>>) -> Result<Vec<u8>, DimseError> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| DimseError::Encode(e.to_string()))?;
    Ok(out)
}

fn ui(tag: dicom_core::Tag, uid: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, PrimitiveValue::from(uid))
}

fn us(tag: dicom_core::Tag, v: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, dicom_value!(U16, [v]))
}

/// A whole command set in one P-DATA-TF PDU on presentation context `pc_id`: how both the
/// SCP and the SCU send their commands (a command set is a few hundred bytes).
pub fn command_pdu(pc_id: u8, data: Vec<u8>) -> dicom_ul::Pdu {
    dicom_ul::Pdu::PData {
        data: vec![dicom_ul::pdu::PDataValue {
            presentation_context_id: pc_id,
            value_type: dicom_ul::pdu::PDataValueType::Command,
            is_last: true,
            data,
        }],
    }
}

pub fn echo_rq(message_id: u16) -> Result<Vec<u8>, DimseError> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION_SOP_CLASS),
        us(tags::COMMAND_FIELD, C_ECHO_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
    ])
}

pub fn echo_rsp(message_id: u16) -> Result<Vec<u8>, DimseError> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION_SOP_CLASS),
        us(tags::COMMAND_FIELD, C_ECHO_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status::SUCCESS),
    ])
}

pub fn store_rq(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
) -> Result<Vec<u8>, DimseError> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class_uid),
        us(tags::COMMAND_FIELD, C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0x0000),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
    ])
}

pub fn store_rsp(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    status: u16,
    error_comment: Option<&str>,
) -> Result<Vec<u8>, DimseError> {
    let mut el = vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class_uid),
        us(tags::COMMAND_FIELD, C_STORE_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
    ];
    if let Some(comment) = error_comment {
        // Error Comment is LO: at most 64 characters.
        let c: String = comment.chars().filter(|c| *c != '\\').take(64).collect();
        el.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(c),
        ));
    }
    encode(el)
}

/// A response to a request we do not implement, with the request's command field.
pub fn unrecognized_rsp(field: u16, message_id: u16) -> Result<Vec<u8>, DimseError> {
    encode(vec![
        us(tags::COMMAND_FIELD, field | 0x8000),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status::UNRECOGNIZED_OPERATION),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trip_keeps_message_id() {
        let rq = Command::parse(&echo_rq(4711).unwrap()).unwrap();
        assert_eq!(rq.field, C_ECHO_RQ);
        assert_eq!(rq.message_id, 4711);
        assert!(!rq.has_data_set);
        let rsp = Command::parse(&echo_rsp(4711).unwrap()).unwrap();
        assert_eq!(rsp.field, C_ECHO_RSP);
        assert_eq!(rsp.message_id, 4711);
        assert_eq!(rsp.status, Some(0));
    }

    #[test]
    fn store_response_carries_status_and_comment() {
        let bytes = store_rsp(7, "1.2.3", "1.2.3.4", 0xA700, Some("spool full")).unwrap();
        let rsp = Command::parse(&bytes).unwrap();
        assert_eq!(rsp.status, Some(0xA700));
        assert_eq!(rsp.message_id, 7);
        assert_eq!(rsp.affected_sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(rsp.error_comment.as_deref(), Some("spool full"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Command::parse(&[1, 2, 3]).is_err());
        assert!(Command::parse(&[0xff; 40]).is_err());
        assert!(Command::parse(&[]).is_err());
    }
}

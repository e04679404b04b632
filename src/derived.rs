//! What the objects scout writes (SR, SEG) share: patient and study attributes copied
//! from the source images, scout's equipment description, creation date/time, coded
//! concepts, derived UIDs, and Part-10 encoding.

use crate::rules::Code;
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::{FileMetaTableBuilder, OpenFileOptions};
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DerivedError {
    #[error("cannot read source header {path}: {detail}")]
    Source {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("cannot encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
}

/// Header (no pixel data) of a source image.
pub fn source_header(path: &Path) -> Result<InMemDicomObject, DerivedError> {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| DerivedError::Source {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    Ok(obj.into_inner())
}

/// Patient and General Study attributes (PS3.3 C.7.1.1, C.7.2.1). Type 2 attributes are
/// written empty when the source lacks them; Type 3 ones only when present.
const TYPE2: [(Tag, VR); 9] = [
    (tags::PATIENT_NAME, VR::PN),
    (tags::PATIENT_ID, VR::LO),
    (tags::PATIENT_BIRTH_DATE, VR::DA),
    (tags::PATIENT_SEX, VR::CS),
    (tags::STUDY_DATE, VR::DA),
    (tags::STUDY_TIME, VR::TM),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    (tags::STUDY_ID, VR::SH),
    (tags::ACCESSION_NUMBER, VR::SH),
];
const TYPE3: [Tag; 6] = [
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::STUDY_DESCRIPTION,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
];

/// A new object with the patient and study of `source`, UTF-8, and SOP class/instance.
pub fn new_object(
    source: &InMemDicomObject,
    sop_class: &str,
    sop_instance: &str,
) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    // Values were decoded from the source's character set; they are re-encoded as UTF-8.
    obj.put(str_el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
    obj.put(str_el(tags::SOP_CLASS_UID, VR::UI, sop_class));
    obj.put(str_el(tags::SOP_INSTANCE_UID, VR::UI, sop_instance));
    for (tag, vr) in TYPE2 {
        match source.get(tag) {
            Some(e) => obj.put(e.clone()),
            None => obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty)),
        };
    }
    for tag in TYPE3 {
        if let Some(e) = source.get(tag) {
            obj.put(e.clone());
        }
    }
    if let Some(e) = source.get(tags::STUDY_INSTANCE_UID) {
        obj.put(e.clone());
    }
    let (date, time) = now_utc();
    obj.put(str_el(tags::INSTANCE_CREATION_DATE, VR::DA, &date));
    obj.put(str_el(tags::INSTANCE_CREATION_TIME, VR::TM, &time));
    obj.put(str_el(tags::CONTENT_DATE, VR::DA, &date));
    obj.put(str_el(tags::CONTENT_TIME, VR::TM, &time));
    obj.put(str_el(tags::SERIES_DATE, VR::DA, &date));
    obj.put(str_el(tags::SERIES_TIME, VR::TM, &time));
    obj.put(str_el(tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000"));
    equipment(&mut obj);
    obj
}

/// General and Enhanced General Equipment (the latter is mandatory for SR 3D and SEG).
fn equipment(obj: &mut InMemDicomObject) {
    obj.put(str_el(tags::MANUFACTURER, VR::LO, "scout"));
    obj.put(str_el(
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        "scout edge agent",
    ));
    obj.put(str_el(tags::DEVICE_SERIAL_NUMBER, VR::LO, &device_serial()));
    obj.put(str_el(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        concat!("scout ", env!("CARGO_PKG_VERSION")),
    ));
}

/// The host name identifies the box a result came from.
pub fn device_serial() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().chars().take(64).collect::<String>())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub fn str_el(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

pub fn int_el(tag: Tag, v: i64) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::IS, PrimitiveValue::from(v.to_string()))
}

pub fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// A code sequence item (PS3.3 Table 8.8-1a).
pub fn code_item(c: &Code) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    if c.value.len() > 16 {
        o.put(str_el(tags::LONG_CODE_VALUE, VR::UC, &c.value));
    } else {
        o.put(str_el(tags::CODE_VALUE, VR::SH, &c.value));
    }
    o.put(str_el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, &c.scheme));
    o.put(str_el(tags::CODE_MEANING, VR::LO, &c.meaning));
    o
}

/// Coding Scheme Identification for local ("99…") schemes among `codes`.
pub fn local_schemes<'a>(obj: &mut InMemDicomObject, codes: impl IntoIterator<Item = &'a Code>) {
    let mut schemes: Vec<&str> = codes
        .into_iter()
        .map(|c| c.scheme.as_str())
        .filter(|s| s.starts_with("99"))
        .collect();
    schemes.sort_unstable();
    schemes.dedup();
    if schemes.is_empty() {
        return;
    }
    let items = schemes
        .into_iter()
        .map(|s| {
            let mut o = InMemDicomObject::new_empty();
            o.put(str_el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, s));
            o.put(str_el(
                tags::CODING_SCHEME_NAME,
                VR::ST,
                "Local codes of this site's scout configuration",
            ));
            o.put(str_el(
                tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
                VR::ST,
                "scout configuration",
            ));
            o
        })
        .collect();
    obj.put(seq(tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE, items));
}

/// A UID that always comes out the same for the same inputs: `2.25.` + 128 bits of
/// SHA-256 over the parts.
pub fn derived_uid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// Part-10 bytes, Explicit VR Little Endian.
pub fn part10(obj: InMemDicomObject, what: &'static str) -> Result<Vec<u8>, DerivedError> {
    let err = |d: String| DerivedError::Encode { what, detail: d };
    let class = string(&obj, tags::SOP_CLASS_UID).ok_or_else(|| err("no SOP Class UID".into()))?;
    let uid =
        string(&obj, tags::SOP_INSTANCE_UID).ok_or_else(|| err("no SOP Instance UID".into()))?;
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(class)
        .media_storage_sop_instance_uid(uid)
        .transfer_syntax(dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(concat!("SCOUT_", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    obj.with_exact_meta(meta)
        .write_all(&mut out)
        .map_err(|e| err(e.to_string()))?;
    Ok(out)
}

/// scout's implementation class UID (derived once from its name under 2.25).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.238741402591436716352203545733316466787";

pub fn string(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)?
        .to_str()
        .ok()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
}

/// (DA, TM) of now in UTC.
pub fn now_utc() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}{m:02}{d:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn derived_uids_are_valid_and_stable() {
        let a = super::derived_uid(&["x", "y"]);
        assert_eq!(a, super::derived_uid(&["x", "y"]));
        assert_ne!(a, super::derived_uid(&["xy"]));
        assert!(crate::config::is_valid_uid(&a), "{a}");
        assert!(crate::config::is_valid_uid(super::IMPLEMENTATION_CLASS_UID));
        let (d, t) = super::now_utc();
        assert_eq!((d.len(), t.len()), (8, 6));
        assert!(d.as_str() >= "20260101");
    }
}

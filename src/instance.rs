//! What the agent knows about one stored instance: identifiers, the attributes that
//! series rules look at, and its geometry. Read from a parsed data set.

use crate::geometry::SliceGeometry;
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::Tag;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("required attribute {name} {tag} is missing or empty")]
    Missing { name: &'static str, tag: Tag },
    #[error("attribute {name} {tag} holds {value:?}, which cannot serve as a UID")]
    BadUid {
        name: &'static str,
        tag: Tag,
        value: String,
    },
}

/// Plain data about one instance, handed from the spool to series assembly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub modality: Option<String>,
    pub series_number: Option<i64>,
    pub instance_number: Option<i64>,
    pub acquisition_number: Option<i64>,
    pub image_type: Vec<String>,
    pub series_description: Option<String>,
    pub protocol_name: Option<String>,
    pub body_part_examined: Option<String>,
    pub images_in_acquisition: Option<u32>,
    pub number_of_frames: Option<u32>,
    pub geometry: SliceGeometry,
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag)?.to_int::<i64>().ok()
}

fn floats<const N: usize>(obj: &InMemDicomObject, tag: Tag) -> Option<[f64; N]> {
    let v = obj.get(tag)?.to_multi_float64().ok()?;
    let arr: [f64; N] = v.get(..N)?.try_into().ok()?;
    arr.iter().all(|x| x.is_finite()).then_some(arr)
}

/// UIDs end up in file names, so anything beyond digits and dots is refused here rather
/// than risk a path such as `../`.
fn uid(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<String, MetaError> {
    let value = text(obj, tag).ok_or(MetaError::Missing { name, tag })?;
    if value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && value.bytes().any(|b| b.is_ascii_digit())
    {
        Ok(value)
    } else {
        Err(MetaError::BadUid { name, tag, value })
    }
}

/// Geometry lives at the top level for classic images and in the functional groups for
/// enhanced multi-frame ones: the top level wins, then the shared group, then frame 1.
fn geometry(obj: &InMemDicomObject) -> SliceGeometry {
    let groups: Vec<&InMemDicomObject> = [
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
    ]
    .iter()
    .filter_map(|t| obj.get(*t)?.items()?.first())
    .collect();
    fn lookup<const N: usize>(
        obj: &InMemDicomObject,
        groups: &[&InMemDicomObject],
        macro_seq: Tag,
        tag: Tag,
    ) -> Option<[f64; N]> {
        floats::<N>(obj, tag).or_else(|| {
            groups
                .iter()
                .find_map(|g| floats::<N>(g.get(macro_seq)?.items()?.first()?, tag))
        })
    }
    SliceGeometry {
        rows: int(obj, tags::ROWS)
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(0),
        columns: int(obj, tags::COLUMNS)
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(0),
        pixel_spacing: lookup(
            obj,
            &groups,
            tags::PIXEL_MEASURES_SEQUENCE,
            tags::PIXEL_SPACING,
        ),
        orientation: lookup(
            obj,
            &groups,
            tags::PLANE_ORIENTATION_SEQUENCE,
            tags::IMAGE_ORIENTATION_PATIENT,
        ),
        position: lookup(
            obj,
            &groups,
            tags::PLANE_POSITION_SEQUENCE,
            tags::IMAGE_POSITION_PATIENT,
        ),
        slice_thickness: lookup::<1>(
            obj,
            &groups,
            tags::PIXEL_MEASURES_SEQUENCE,
            tags::SLICE_THICKNESS,
        )
        .map(|a| a[0]),
        frame_of_reference_uid: text(obj, tags::FRAME_OF_REFERENCE_UID),
    }
}

impl InstanceMeta {
    pub fn from_object(obj: &InMemDicomObject) -> Result<InstanceMeta, MetaError> {
        Ok(InstanceMeta {
            sop_class_uid: uid(obj, tags::SOP_CLASS_UID, "SOP Class UID")?,
            sop_instance_uid: uid(obj, tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
            study_instance_uid: uid(obj, tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
            series_instance_uid: uid(obj, tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
            modality: text(obj, tags::MODALITY),
            series_number: int(obj, tags::SERIES_NUMBER),
            instance_number: int(obj, tags::INSTANCE_NUMBER),
            acquisition_number: int(obj, tags::ACQUISITION_NUMBER),
            image_type: obj
                .get(tags::IMAGE_TYPE)
                .and_then(|e| e.to_multi_str().ok())
                .map(|v| v.iter().map(|s| s.trim().to_uppercase()).collect())
                .unwrap_or_default(),
            series_description: text(obj, tags::SERIES_DESCRIPTION),
            protocol_name: text(obj, tags::PROTOCOL_NAME),
            body_part_examined: text(obj, tags::BODY_PART_EXAMINED),
            images_in_acquisition: int(obj, tags::IMAGES_IN_ACQUISITION)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0),
            number_of_frames: int(obj, tags::NUMBER_OF_FRAMES).and_then(|v| u32::try_from(v).ok()),
            geometry: geometry(obj),
        })
    }
}

//! Structures as a binary DICOM Segmentation (PS3.3 A.51), one object per stack: one
//! segment per structure with the configured category/type codes, one frame per
//! (segment, analysed source image) that holds the structure, each frame referencing its
//! source image and carrying its plane position.

use crate::derived::{self, code_item, int_el, seq, str_el, DerivedError};
use crate::results::{SeriesResult, StackResult};
use crate::rules::Code;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;

pub const SEGMENTATION: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const SERIES_NUMBER: i64 = 9902;

fn ds(v: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(v.iter().map(|x| format!("{x:.6}")).collect())
}

/// The SEG's SOP Instance UID for stack `stack` of a result.
pub fn instance_uid(r: &SeriesResult, stack: usize) -> String {
    derived::derived_uid(&[&r.key, "seg", &stack.to_string()])
}

/// Builds the SEG of one stack, or None when no structure was found in it.
pub fn build(
    r: &SeriesResult,
    stack_index: usize,
    source: &InMemDicomObject,
) -> Result<Option<Vec<u8>>, DerivedError> {
    let stack: &StackResult = &r.stacks[stack_index];
    let Some(first) = stack.structures.iter().flat_map(|s| s.masks.first()).next() else {
        return Ok(None);
    };
    let geometry = &stack.images[first.0].geometry;
    let (rows, cols) = first.1.dim();
    let err = |d: &str| DerivedError::Encode {
        what: "Segmentation",
        detail: d.to_string(),
    };
    let (Some(orientation), Some(spacing), Some(frame_of_reference)) = (
        geometry.orientation,
        geometry.pixel_spacing,
        geometry.frame_of_reference_uid.as_deref(),
    ) else {
        return Err(err(
            "source images lack orientation, spacing or frame of reference",
        ));
    };

    let mut obj = derived::new_object(source, SEGMENTATION, &instance_uid(r, stack_index));
    obj.put(str_el(tags::MODALITY, VR::CS, "SEG"));
    obj.put(str_el(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &derived::derived_uid(&[&r.key, "seg series"]),
    ));
    obj.put(int_el(tags::SERIES_NUMBER, SERIES_NUMBER));
    obj.put(str_el(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &format!("scout structures ({})", r.rule),
    ));
    obj.put(int_el(tags::INSTANCE_NUMBER, stack_index as i64 + 1));
    obj.put(str_el(
        tags::FRAME_OF_REFERENCE_UID,
        VR::UI,
        frame_of_reference,
    ));
    match source.get(tags::POSITION_REFERENCE_INDICATOR) {
        Some(e) => obj.put(e.clone()),
        None => obj.put(DataElement::new(
            tags::POSITION_REFERENCE_INDICATOR,
            VR::LO,
            PrimitiveValue::Empty,
        )),
    };
    // Segmentation Image.
    obj.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        PrimitiveValue::Strs(["DERIVED".to_string(), "PRIMARY".to_string()].into()),
    ));
    obj.put(str_el(tags::CONTENT_LABEL, VR::CS, "SCOUT"));
    obj.put(str_el(
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        &format!("{} ({})", r.algorithm_name, r.algorithm_version),
    ));
    obj.put(DataElement::new(
        tags::CONTENT_CREATOR_NAME,
        VR::PN,
        PrimitiveValue::Empty,
    ));
    obj.put(str_el(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"));
    obj.put(str_el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"));
    let mut codes: Vec<&Code> = Vec::new();
    let segments = stack
        .structures
        .iter()
        .enumerate()
        .map(|(i, s)| {
            codes.push(&s.code.category);
            codes.push(&s.code.kind);
            let mut o = InMemDicomObject::new_empty();
            o.put(DataElement::new(
                tags::SEGMENT_NUMBER,
                VR::US,
                dicom_value!(U16, [i as u16 + 1]),
            ));
            o.put(str_el(tags::SEGMENT_LABEL, VR::LO, &s.code.label));
            o.put(str_el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"));
            o.put(str_el(
                tags::SEGMENT_ALGORITHM_NAME,
                VR::LO,
                &r.algorithm_name,
            ));
            o.put(seq(
                tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                vec![code_item(&s.code.category)],
            ));
            o.put(seq(
                tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
                vec![code_item(&s.code.kind)],
            ));
            o
        })
        .collect();
    obj.put(seq(tags::SEGMENT_SEQUENCE, segments));
    derived::local_schemes(&mut obj, codes);

    // Frames: segment-major, then source order; the pixel data is one bit per pixel,
    // frames packed back to back (PS3.5 8.1.1: no padding between frames).
    let mut per_frame = Vec::new();
    let mut bits: Vec<u8> = Vec::new();
    let mut nbits = 0usize;
    for (si, s) in stack.structures.iter().enumerate() {
        for (ii, mask) in &s.masks {
            if mask.dim() != (rows, cols) {
                log::warn!(
                    "seg: {} has another size than the stack's first image; left out",
                    stack.images[*ii].sop_instance_uid
                );
                continue;
            }
            let img = &stack.images[*ii];
            let Some(position) = img.geometry.position else {
                continue;
            };
            for &v in mask.iter() {
                if nbits.is_multiple_of(8) {
                    bits.push(0);
                }
                if v {
                    let last = bits.len() - 1;
                    bits[last] |= 1 << (nbits % 8);
                }
                nbits += 1;
            }
            let mut source_ref = InMemDicomObject::new_empty();
            source_ref.put(str_el(
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                &img.sop_class_uid,
            ));
            source_ref.put(str_el(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &img.sop_instance_uid,
            ));
            source_ref.put(seq(
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                vec![code_item(&Code::new(
                    "DCM",
                    "121322",
                    "Source image for image processing operation",
                ))],
            ));
            let mut derivation = InMemDicomObject::new_empty();
            derivation.put(seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source_ref]));
            derivation.put(seq(
                tags::DERIVATION_CODE_SEQUENCE,
                vec![code_item(&Code::new("DCM", "113076", "Segmentation"))],
            ));
            let mut content = InMemDicomObject::new_empty();
            content.put(DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                dicom_value!(U32, [si as u32 + 1, *ii as u32 + 1]),
            ));
            let mut plane = InMemDicomObject::new_empty();
            plane.put(DataElement::new(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                ds(&position),
            ));
            let mut ident = InMemDicomObject::new_empty();
            ident.put(DataElement::new(
                tags::REFERENCED_SEGMENT_NUMBER,
                VR::US,
                dicom_value!(U16, [si as u16 + 1]),
            ));
            let mut frame = InMemDicomObject::new_empty();
            frame.put(seq(tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]));
            frame.put(seq(tags::FRAME_CONTENT_SEQUENCE, vec![content]));
            frame.put(seq(tags::PLANE_POSITION_SEQUENCE, vec![plane]));
            frame.put(seq(tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![ident]));
            per_frame.push(frame);
        }
    }
    if per_frame.is_empty() {
        return Ok(None);
    }
    if !bits.len().is_multiple_of(2) {
        bits.push(0);
    }
    obj.put(int_el(tags::NUMBER_OF_FRAMES, per_frame.len() as i64));
    obj.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
    let mut measures = InMemDicomObject::new_empty();
    measures.put(DataElement::new(tags::PIXEL_SPACING, VR::DS, ds(&spacing)));
    measures.put(DataElement::new(
        tags::SLICE_THICKNESS,
        VR::DS,
        ds(&[geometry.slice_thickness.unwrap_or(1.0)]),
    ));
    let mut orient = InMemDicomObject::new_empty();
    orient.put(DataElement::new(
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        ds(&orientation),
    ));
    let mut shared = InMemDicomObject::new_empty();
    shared.put(seq(tags::PIXEL_MEASURES_SEQUENCE, vec![measures]));
    shared.put(seq(tags::PLANE_ORIENTATION_SEQUENCE, vec![orient]));
    obj.put(seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));

    // Multi-frame Dimension: frames are indexed by segment number, then position.
    let dim_uid = derived::derived_uid(&[&r.key, "seg dimensions", &stack_index.to_string()]);
    let mut org = InMemDicomObject::new_empty();
    org.put(str_el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_uid));
    obj.put(seq(tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]));
    let dim = |pointer: Tag, group: Tag, label: &str| {
        let mut o = InMemDicomObject::new_empty();
        o.put(str_el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_uid));
        o.put(DataElement::new(
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            dicom_value!(Tags, [pointer]),
        ));
        o.put(DataElement::new(
            tags::FUNCTIONAL_GROUP_POINTER,
            VR::AT,
            dicom_value!(Tags, [group]),
        ));
        o.put(str_el(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label));
        o
    };
    obj.put(seq(
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dim(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "Segment Number",
            ),
            dim(
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "Image Position Patient",
            ),
        ],
    ));

    // Common Instance Reference: every source image of the stack.
    let mut series = InMemDicomObject::new_empty();
    series.put(str_el(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &r.series_instance_uid,
    ));
    series.put(seq(
        tags::REFERENCED_INSTANCE_SEQUENCE,
        stack
            .images
            .iter()
            .map(|i| {
                let mut o = InMemDicomObject::new_empty();
                o.put(str_el(
                    tags::REFERENCED_SOP_CLASS_UID,
                    VR::UI,
                    &i.sop_class_uid,
                ));
                o.put(str_el(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    &i.sop_instance_uid,
                ));
                o
            })
            .collect(),
    ));
    obj.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series]));

    // Image Pixel.
    obj.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        dicom_value!(U16, [1]),
    ));
    obj.put(str_el(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    ));
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        dicom_value!(U16, [rows as u16]),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        dicom_value!(U16, [cols as u16]),
    ));
    obj.put(DataElement::new(
        tags::BITS_ALLOCATED,
        VR::US,
        dicom_value!(U16, [1]),
    ));
    obj.put(DataElement::new(
        tags::BITS_STORED,
        VR::US,
        dicom_value!(U16, [1]),
    ));
    obj.put(DataElement::new(
        tags::HIGH_BIT,
        VR::US,
        dicom_value!(U16, [0]),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        dicom_value!(U16, [0]),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(bits),
    ));
    derived::part10(obj, "Segmentation").map(Some)
}

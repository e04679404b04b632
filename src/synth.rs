//! Synthetic MR series with consistent geometry, for tests, benchmarks and manual trials
//! (`scout synth`). The pixels are a smooth phantom: an ellipse with a gradient, so the
//! images compress and look like images, not noise.

use crate::geometry::Plane;
use crate::uid::new_uid;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::mem::InMemDicomObject;
use dicom_object::FileMetaTableBuilder;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Slices per plane.
    pub slices: usize,
    pub rows: u16,
    pub columns: u16,
    /// One stack per plane; several make a multi-plane localizer in one series.
    pub planes: Vec<Plane>,
    pub localizer: bool,
    pub series_description: String,
    /// Write Images in Acquisition (0020,1002) = total instance count.
    pub images_in_acquisition: bool,
    pub slice_gap_mm: f64,
    /// Pixel values per slice (rows × columns each, one plane); empty: the phantom.
    pub images: Vec<ndarray::Array2<u16>>,
    /// The images are negatives (air bright): written as MONOCHROME1.
    pub negatives: bool,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            slices: 9,
            rows: 256,
            columns: 256,
            planes: vec![Plane::Sagittal],
            localizer: true,
            series_description: "SYNTH LOCALIZER".into(),
            images_in_acquisition: false,
            slice_gap_mm: 5.0,
            images: Vec::new(),
            negatives: false,
        }
    }
}

/// What was written, for checks.
#[derive(Debug, Clone)]
pub struct SynthSeries {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub files: Vec<PathBuf>,
}

fn orientation(plane: Plane) -> [f64; 6] {
    match plane {
        Plane::Axial | Plane::Unknown => [1., 0., 0., 0., 1., 0.],
        Plane::Coronal => [1., 0., 0., 0., 0., -1.],
        Plane::Sagittal => [0., 1., 0., 0., 0., -1.],
    }
}

fn phantom(rows: u16, columns: u16, k: usize) -> Vec<u8> {
    let (r, c) = (rows as f64, columns as f64);
    let mut out = Vec::with_capacity(rows as usize * columns as usize * 2);
    for y in 0..rows as usize {
        for x in 0..columns as usize {
            let dy = (y as f64 - r / 2.0) / (r * 0.4);
            let dx = (x as f64 - c / 2.0) / (c * 0.3);
            let inside = dx * dx + dy * dy <= 1.0;
            let v: u16 = if inside {
                400 + ((x + y + 7 * k) % 200) as u16 * 4
            } else {
                0
            };
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn ds(v: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(v.iter().map(|x| format!("{x:.6}")).collect())
}

/// Writes one series (Explicit VR Little Endian Part-10 files) into `dir`.
pub fn write_series(dir: &Path, spec: &SynthSpec) -> Result<SynthSeries, String> {
    if spec
        .images
        .iter()
        .any(|i| i.dim() != (spec.rows as usize, spec.columns as usize))
        || (!spec.images.is_empty() && (spec.images.len() != spec.slices || spec.planes.len() != 1))
    {
        return Err("images must be one rows × columns array per slice of one plane".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let study = new_uid();
    let series = new_uid();
    let frame_of_reference = new_uid();
    let total = spec.slices * spec.planes.len();
    let spacing = 1.0;
    let mut files = Vec::with_capacity(total);
    let mut number = 0;
    for &plane in &spec.planes {
        let o = orientation(plane);
        let normal = [
            o[1] * o[5] - o[2] * o[4],
            o[2] * o[3] - o[0] * o[5],
            o[0] * o[4] - o[1] * o[3],
        ];
        for k in 0..spec.slices {
            number += 1;
            let offset = (k as f64 - (spec.slices as f64 - 1.0) / 2.0) * spec.slice_gap_mm;
            // Centre the image on the isocentre, then step along the normal.
            let half_r = spec.rows as f64 * spacing / 2.0;
            let half_c = spec.columns as f64 * spacing / 2.0;
            let pos: Vec<f64> = (0..3)
                .map(|i| -o[i] * half_c - o[3 + i] * half_r + normal[i] * offset)
                .collect();
            let sop = new_uid();
            let image_type: Vec<String> = if spec.localizer {
                vec!["ORIGINAL".into(), "PRIMARY".into(), "LOCALIZER".into()]
            } else {
                vec!["ORIGINAL".into(), "PRIMARY".into(), "M".into()]
            };
            let mut obj = InMemDicomObject::from_element_iter([
                DataElement::new(
                    tags::SPECIFIC_CHARACTER_SET,
                    VR::CS,
                    PrimitiveValue::from("ISO_IR 100"),
                ),
                DataElement::new(
                    tags::IMAGE_TYPE,
                    VR::CS,
                    PrimitiveValue::Strs(image_type.into()),
                ),
                DataElement::new(
                    tags::SOP_CLASS_UID,
                    VR::UI,
                    PrimitiveValue::from(uids::MR_IMAGE_STORAGE),
                ),
                DataElement::new(
                    tags::SOP_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from(sop.as_str()),
                ),
                DataElement::new(tags::STUDY_DATE, VR::DA, PrimitiveValue::from("20260101")),
                DataElement::new(tags::STUDY_TIME, VR::TM, PrimitiveValue::from("120000")),
                DataElement::new(
                    tags::ACCESSION_NUMBER,
                    VR::SH,
                    PrimitiveValue::from("SYNTH1"),
                ),
                DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("MR")),
                DataElement::new(
                    tags::MANUFACTURER,
                    VR::LO,
                    PrimitiveValue::from("scout synth"),
                ),
                DataElement::new(
                    tags::REFERRING_PHYSICIAN_NAME,
                    VR::PN,
                    PrimitiveValue::from(""),
                ),
                DataElement::new(
                    tags::SERIES_DESCRIPTION,
                    VR::LO,
                    PrimitiveValue::from(spec.series_description.as_str()),
                ),
                DataElement::new(
                    tags::PATIENT_NAME,
                    VR::PN,
                    PrimitiveValue::from("SYNTH^PHANTOM"),
                ),
                DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("SYNTH-0001")),
                DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, PrimitiveValue::from("")),
                DataElement::new(tags::PATIENT_SEX, VR::CS, PrimitiveValue::from("O")),
                DataElement::new(
                    tags::BODY_PART_EXAMINED,
                    VR::CS,
                    PrimitiveValue::from("SPINE"),
                ),
                DataElement::new(tags::SCANNING_SEQUENCE, VR::CS, PrimitiveValue::from("GR")),
                DataElement::new(tags::SEQUENCE_VARIANT, VR::CS, PrimitiveValue::from("SP")),
                DataElement::new(tags::SCAN_OPTIONS, VR::CS, PrimitiveValue::from("")),
                DataElement::new(
                    tags::MR_ACQUISITION_TYPE,
                    VR::CS,
                    PrimitiveValue::from("2D"),
                ),
                DataElement::new(
                    tags::SLICE_THICKNESS,
                    VR::DS,
                    ds(&[spec.slice_gap_mm.min(5.0)]),
                ),
                DataElement::new(tags::REPETITION_TIME, VR::DS, ds(&[8.6])),
                DataElement::new(tags::ECHO_TIME, VR::DS, ds(&[4.0])),
                DataElement::new(tags::ECHO_TRAIN_LENGTH, VR::IS, PrimitiveValue::from("1")),
                DataElement::new(
                    tags::STUDY_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from(study.as_str()),
                ),
                DataElement::new(
                    tags::SERIES_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from(series.as_str()),
                ),
                DataElement::new(tags::STUDY_ID, VR::SH, PrimitiveValue::from("1")),
                DataElement::new(tags::SERIES_NUMBER, VR::IS, PrimitiveValue::from("1")),
                DataElement::new(
                    tags::INSTANCE_NUMBER,
                    VR::IS,
                    PrimitiveValue::from(number.to_string()),
                ),
                DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, ds(&pos)),
                DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds(&o)),
                DataElement::new(
                    tags::FRAME_OF_REFERENCE_UID,
                    VR::UI,
                    PrimitiveValue::from(frame_of_reference.as_str()),
                ),
                DataElement::new(
                    tags::POSITION_REFERENCE_INDICATOR,
                    VR::LO,
                    PrimitiveValue::from(""),
                ),
                DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, [1])),
                DataElement::new(
                    tags::PHOTOMETRIC_INTERPRETATION,
                    VR::CS,
                    PrimitiveValue::from(if spec.negatives {
                        "MONOCHROME1"
                    } else {
                        "MONOCHROME2"
                    }),
                ),
                DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, [spec.rows])),
                DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, [spec.columns])),
                DataElement::new(tags::PIXEL_SPACING, VR::DS, ds(&[spacing, spacing])),
                DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, [16])),
                DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, [12])),
                DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, [11])),
                DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, dicom_value!(U16, [0])),
                DataElement::new(
                    tags::PIXEL_DATA,
                    VR::OW,
                    PrimitiveValue::from(match spec.images.get(k) {
                        Some(img) => img.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        None => phantom(spec.rows, spec.columns, k),
                    }),
                ),
            ]);
            if spec.images_in_acquisition {
                obj.put(DataElement::new(
                    tags::IMAGES_IN_ACQUISITION,
                    VR::IS,
                    PrimitiveValue::from(total.to_string()),
                ));
            }
            let meta = FileMetaTableBuilder::new()
                .media_storage_sop_class_uid(uids::MR_IMAGE_STORAGE)
                .media_storage_sop_instance_uid(sop.as_str())
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .build()
                .map_err(|e| e.to_string())?;
            let path = dir.join(format!("{number:04}.dcm"));
            obj.with_exact_meta(meta)
                .write_to_file(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            files.push(path);
        }
    }
    Ok(SynthSeries {
        study_instance_uid: study,
        series_instance_uid: series,
        files,
    })
}

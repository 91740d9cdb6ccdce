//! The expert artifact format: manifest types, mask codecs, the `.xpm` container and the
//! unpacked layout. Specification: docs/format.md.

pub mod artifact;
pub mod dtype;
pub mod manifest;
pub mod mask;
pub mod st;
pub mod tensor;
pub mod unpacked;
pub mod verify;

pub use artifact::{ArtifactReader, ArtifactWriter, EncodedTensor, encode_tensor, encode_view};
pub use dtype::Dtype;
pub use manifest::{BaseModel, Delta, ExpertKind, Manifest, TensorEntry};
pub use mask::MaskEncoding;
pub use tensor::{Content, ContentView, TensorData, TensorView};

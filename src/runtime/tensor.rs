//! Typed tensors in and out of ONNX Runtime sessions.
//!
//! Tasks build their inputs in the types natural to them (token ids as i64, pixels as f32) and
//! read outputs as f32; the conversions a particular export needs (int32 ids, fp16 pixels and
//! logits, bool masks) happen here, once, against the types the session declares.

use std::borrow::Cow;

use half::f16;
use ort::memory::Allocator;
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, ValueType};

/// The values of an input tensor, in one of the element types ferry produces.
#[derive(Debug, Clone)]
pub enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
    U8(Vec<u8>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::Bool(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn element(&self) -> TensorElementType {
        match self {
            Data::F32(_) => TensorElementType::Float32,
            Data::F16(_) => TensorElementType::Float16,
            Data::I64(_) => TensorElementType::Int64,
            Data::I32(_) => TensorElementType::Int32,
            Data::Bool(_) => TensorElementType::Bool,
            Data::U8(_) => TensorElementType::Uint8,
        }
    }

    /// The same values as `want`, for the conversions a model export can ask for: floats
    /// between f32 and f16, integers between i64, i32 and u8, and integers to bool (non-zero).
    fn convert(self, want: TensorElementType) -> Result<Data, String> {
        use TensorElementType as T;
        let have = self.element();
        if have == want {
            return Ok(self);
        }
        let ints = |d: Data| -> Option<Vec<i64>> {
            match d {
                Data::I64(v) => Some(v),
                Data::I32(v) => Some(v.into_iter().map(i64::from).collect()),
                Data::U8(v) => Some(v.into_iter().map(i64::from).collect()),
                Data::Bool(v) => Some(v.into_iter().map(i64::from).collect()),
                _ => None,
            }
        };
        let floats = |d: Data| -> Option<Vec<f32>> {
            match d {
                Data::F32(v) => Some(v),
                Data::F16(v) => Some(v.into_iter().map(f16::to_f32).collect()),
                _ => None,
            }
        };
        let converted = match want {
            T::Float32 => floats(self).map(Data::F32),
            T::Float16 => {
                floats(self).map(|v| Data::F16(v.into_iter().map(f16::from_f32).collect()))
            }
            T::Int64 => ints(self).map(Data::I64),
            T::Int32 => ints(self).map(|v| Data::I32(v.into_iter().map(|x| x as i32).collect())),
            T::Uint8 => ints(self).map(|v| Data::U8(v.into_iter().map(|x| x as u8).collect())),
            T::Bool => ints(self).map(|v| Data::Bool(v.into_iter().map(|x| x != 0).collect())),
            _ => None,
        };
        converted.ok_or_else(|| format!("cannot convert {have} values to {want}"))
    }
}

/// A named model input: its shape and values.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

impl Input {
    pub fn new(name: impl Into<String>, shape: Vec<i64>, data: Data) -> Self {
        Input {
            name: name.into(),
            shape,
            data,
        }
    }

    /// The value itself, of element type `want` (the data's own type when None).
    pub fn into_dyn(self, want: Option<TensorElementType>) -> Result<DynValue, String> {
        self.into_dyn_in(want, None)
    }

    /// [`Input::into_dyn`] with the values in memory from `allocator` (e.g. CUDA's pinned host
    /// memory); from the process heap when None.
    pub fn into_dyn_in(
        self,
        want: Option<TensorElementType>,
        allocator: Option<&Allocator>,
    ) -> Result<DynValue, String> {
        let name = self.name;
        let err = |e: ort::Error| format!("input '{name}': {e}");
        let data = match want {
            Some(w) => self
                .data
                .convert(w)
                .map_err(|e| format!("input '{name}': {e}"))?,
            None => self.data,
        };
        let shape = self.shape;
        if let Some(allocator) = allocator.filter(|_| !data.is_empty()) {
            return match &data {
                Data::F32(v) => copied(allocator, shape, v),
                Data::F16(v) => copied(allocator, shape, v),
                Data::I64(v) => copied(allocator, shape, v),
                Data::I32(v) => copied(allocator, shape, v),
                Data::Bool(v) => copied(allocator, shape, v),
                Data::U8(v) => copied(allocator, shape, v),
            }
            .map_err(err);
        }
        Ok(match data {
            Data::F32(v) => Tensor::from_array((shape, v)).map_err(err)?.into_dyn(),
            Data::F16(v) => Tensor::from_array((shape, v)).map_err(err)?.into_dyn(),
            Data::I64(v) => Tensor::from_array((shape, v)).map_err(err)?.into_dyn(),
            Data::I32(v) => Tensor::from_array((shape, v)).map_err(err)?.into_dyn(),
            Data::Bool(v) => Tensor::from_array((shape, v)).map_err(err)?.into_dyn(),
            Data::U8(v) => Tensor::from_array((shape, v)).map_err(err)?.into_dyn(),
        })
    }
}

/// A tensor of `values` in memory from `allocator`.
fn copied<T: PrimitiveTensorElementType + Copy + std::fmt::Debug>(
    allocator: &Allocator,
    shape: Vec<i64>,
    values: &[T],
) -> ort::Result<DynValue> {
    let mut tensor = Tensor::<T>::new(allocator, shape)?;
    let (_, data) = tensor.extract_tensor_mut();
    if data.len() != values.len() {
        return Err(ort::Error::new(format!(
            "{} values for a tensor of {}",
            values.len(),
            data.len()
        )));
    }
    data.copy_from_slice(values);
    Ok(tensor.into_dyn())
}

/// The element type of a tensor value (None for other values).
pub fn element_type(value: &DynValue) -> Option<TensorElementType> {
    match value.dtype() {
        ValueType::Tensor { ty, .. } => Some(*ty),
        _ => None,
    }
}

/// A model output read as f32: borrowed when the model emits f32, converted otherwise.
#[derive(Debug)]
pub struct Output<'a> {
    pub name: &'a str,
    pub shape: Vec<i64>,
    pub data: Cow<'a, [f32]>,
}

impl Output<'_> {
    /// Checks the shape (`usize::MAX` = any size), naming the output in the error.
    pub fn expect_shape(&self, want: &[usize]) -> Result<(), String> {
        check_shape(self.name, &self.shape, want)
    }

    /// The shape as sizes.
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d.max(0) as usize).collect()
    }
}

/// See [`Output::expect_shape`].
pub fn check_shape(name: &str, shape: &[i64], want: &[usize]) -> Result<(), String> {
    let ok = shape.len() == want.len()
        && shape
            .iter()
            .zip(want)
            .all(|(&s, &w)| w == usize::MAX || s as usize == w);
    if ok {
        return Ok(());
    }
    let want: Vec<String> = want
        .iter()
        .map(|&w| {
            if w == usize::MAX {
                "?".into()
            } else {
                w.to_string()
            }
        })
        .collect();
    Err(format!(
        "output '{name}' has shape {shape:?}, expected [{}]",
        want.join(", ")
    ))
}

/// Reads `value` (the output `name`) as f32, converting from f16, bf16, f64 and integers.
pub fn read_f32<'a>(name: &'a str, value: &'a DynValue) -> Result<Output<'a>, String> {
    use TensorElementType as T;
    let err = |e: ort::Error| format!("output '{name}': {e}");
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(format!("output '{name}' is not a tensor"));
    };
    macro_rules! widen {
        ($t:ty, $f:expr) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(err)?;
            (shape.to_vec(), Cow::Owned(data.iter().map($f).collect()))
        }};
    }
    let (shape, data) = match ty {
        T::Float32 => {
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(err)?;
            (shape.to_vec(), Cow::Borrowed(data))
        }
        T::Float16 => widen!(f16, |v: &f16| v.to_f32()),
        T::Bfloat16 => widen!(half::bf16, |v: &half::bf16| v.to_f32()),
        T::Float64 => widen!(f64, |&v: &f64| v as f32),
        T::Int64 => widen!(i64, |&v: &i64| v as f32),
        T::Int32 => widen!(i32, |&v: &i32| v as f32),
        T::Uint8 => widen!(u8, |&v: &u8| v as f32),
        T::Bool => widen!(bool, |&v: &bool| if v { 1.0 } else { 0.0 }),
        other => {
            return Err(format!(
                "output '{name}' has element type {other}; ferry reads numbers"
            ));
        }
    };
    Ok(Output { name, shape, data })
}

/// Model outputs by name: a session run's, or values taken out of one.
pub trait Outputs {
    fn value(&self, name: &str) -> Option<&ort::value::DynValue>;
}

impl Outputs for ort::session::SessionOutputs<'_> {
    fn value(&self, name: &str) -> Option<&ort::value::DynValue> {
        self.get(name)
    }
}

impl Outputs for super::pool::Fetched {
    fn value(&self, name: &str) -> Option<&ort::value::DynValue> {
        self.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Reads the outputs `names` of a session run as f32, in the order named.
pub fn read_named<'a, O: Outputs + ?Sized>(
    outputs: &'a O,
    names: &'a [String],
) -> Result<Vec<Output<'a>>, String> {
    names
        .iter()
        .map(|name| {
            let value = outputs
                .value(name)
                .ok_or_else(|| format!("the model returned no output '{name}'"))?;
            read_f32(name, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values placed in an allocator's memory (pinned host memory for CUDA sessions; the CPU
    /// allocator here) are the values placed on the heap, converted the same way.
    #[test]
    fn inputs_in_an_allocators_memory_equal_the_heaps() {
        crate::runtime::onnxruntime::environment().unwrap();
        let cpu = Allocator::default();
        let cases = [
            (Data::I64(vec![101, 7, 102, 0]), TensorElementType::Int32),
            (
                Data::F32(vec![0.5, -2.0, 3.25, 1.0]),
                TensorElementType::Float16,
            ),
            (Data::I64(vec![1, 1, 0, 0]), TensorElementType::Bool),
            (Data::U8(vec![0, 255, 3, 4]), TensorElementType::Uint8),
        ];
        for (data, want) in cases {
            let input = Input::new("x", vec![2, 2], data);
            let heap = input.clone().into_dyn(Some(want)).unwrap();
            let placed = input.into_dyn_in(Some(want), Some(&cpu)).unwrap();
            assert_eq!(element_type(&placed), Some(want));
            let (a, b) = (
                read_f32("x", &heap).unwrap(),
                read_f32("x", &placed).unwrap(),
            );
            assert_eq!((a.shape, a.data), (b.shape, b.data), "{want:?}");
        }
    }

    #[test]
    fn converts_to_what_the_model_declares() {
        let d = Data::I64(vec![0, 1, 300])
            .convert(TensorElementType::Int32)
            .unwrap();
        assert!(matches!(d, Data::I32(v) if v == vec![0, 1, 300]));
        let d = Data::F32(vec![0.5, -2.0])
            .convert(TensorElementType::Float16)
            .unwrap();
        assert!(matches!(&d, Data::F16(v) if v[0].to_f32() == 0.5 && v[1].to_f32() == -2.0));
        let d = Data::I64(vec![0, 2])
            .convert(TensorElementType::Bool)
            .unwrap();
        assert!(matches!(d, Data::Bool(v) if v == vec![false, true]));
        assert!(
            Data::F32(vec![1.0])
                .convert(TensorElementType::Int64)
                .is_err()
        );
    }

    #[test]
    fn shape_errors_name_the_output() {
        assert!(check_shape("logits", &[2, 3], &[2, usize::MAX]).is_ok());
        let e = check_shape("logits", &[2, 3], &[2, 4]).unwrap_err();
        assert_eq!(e, "output 'logits' has shape [2, 3], expected [2, 4]");
    }
}

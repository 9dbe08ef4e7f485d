//! The one place where core errors become Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::CoreError;

create_exception!(
    moe_offload,
    MoeOffloadError,
    PyException,
    "Base class of every moe-offload error."
);
create_exception!(
    moe_offload,
    BudgetError,
    MoeOffloadError,
    "A memory budget cannot hold what the model needs at once."
);
create_exception!(
    moe_offload,
    UnsupportedModelError,
    MoeOffloadError,
    "The model has no MoE block that moe-offload knows how to offload."
);
create_exception!(
    moe_offload,
    PatchStateError,
    MoeOffloadError,
    "patch/unpatch called on a model in the wrong state."
);
create_exception!(
    moe_offload,
    StoreError,
    MoeOffloadError,
    "An expert store or checkpoint on disk is missing, damaged or does not match the model."
);
create_exception!(
    moe_offload,
    DeviceError,
    MoeOffloadError,
    "The CUDA driver failed or is missing."
);

pub fn to_py(error: CoreError) -> PyErr {
    let message = error.to_string();
    match error {
        CoreError::BudgetTooSmall { .. } => BudgetError::new_err(message),
        CoreError::Cuda(_) => DeviceError::new_err(message),
        CoreError::Store { .. }
        | CoreError::CopyFailed {
            from_store: true, ..
        } => StoreError::new_err(message),
        CoreError::CopyFailed { .. }
        | CoreError::UnknownExpert { .. }
        | CoreError::OutOfBounds { .. }
        | CoreError::Protocol(_)
        | CoreError::InvalidConfig(_)
        | CoreError::EamcFile { .. } => MoeOffloadError::new_err(message),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MoeOffloadError", py.get_type::<MoeOffloadError>())?;
    m.add("BudgetError", py.get_type::<BudgetError>())?;
    m.add(
        "UnsupportedModelError",
        py.get_type::<UnsupportedModelError>(),
    )?;
    m.add("PatchStateError", py.get_type::<PatchStateError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    Ok(())
}

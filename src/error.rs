//! Error text shared by the modules that surface DataFusion's errors to users.

use datafusion::error::DataFusionError;

/// Strips DataFusion's wrapping ("Error during planning: ...") down to the user's part.
pub fn df_message(e: &DataFusionError) -> String {
    match e.find_root() {
        DataFusionError::Plan(m) | DataFusionError::Execution(m) => m.clone(),
        other => other.to_string(),
    }
}

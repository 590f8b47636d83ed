//! The table a stream's plan reads: each micro-batch is put in it before the plan runs, so a
//! stream uses the very plan (SQL steps, operator projections) that a file source would.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::Result;
use datafusion::datasource::TableProvider;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

/// Holds the current micro-batch.
#[derive(Debug)]
pub struct MicroBatchTable {
    schema: SchemaRef,
    current: Arc<Mutex<Vec<RecordBatch>>>,
}

impl MicroBatchTable {
    pub fn new(schema: SchemaRef) -> Self {
        MicroBatchTable {
            schema,
            current: Arc::default(),
        }
    }

    /// The slot the runner fills before each execution.
    pub fn slot(&self) -> Arc<Mutex<Vec<RecordBatch>>> {
        Arc::clone(&self.current)
    }
}

#[async_trait]
impl TableProvider for MicroBatchTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batches = self.current.lock().expect("micro-batch slot").clone();
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?)
    }
}

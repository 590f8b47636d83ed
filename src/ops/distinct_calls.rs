//! One model call per distinct operator call in a projection.
//!
//! DataFusion computes async functions (ferry's operators) in an `AsyncFuncExec` below the
//! projection that uses them, one column per call found in the projection's expressions. A
//! query such as `SELECT f(text)['label'], f(text)['score']` names the same call twice, and
//! the plan computes it twice: common subexpression elimination shares it in the logical plan,
//! but the later leaf-projection rules inline it again, and the physical planner does not
//! deduplicate the calls it extracts (it reads only the first of two equal columns). This rule
//! keeps the first of equal calls and fills the others' columns from it.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::physical_expr::async_scalar_function::AsyncFuncExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::async_func::AsyncFuncExec;
use datafusion::physical_plan::projection::ProjectionExec;

/// Removes repeated calls from every `AsyncFuncExec` (see the module's documentation).
#[derive(Debug, Default)]
pub struct DistinctCalls;

impl PhysicalOptimizerRule for DistinctCalls {
    fn name(&self) -> &str {
        "ferry_distinct_operator_calls"
    }

    fn schema_check(&self) -> bool {
        true
    }

    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(exec) = node.downcast_ref::<AsyncFuncExec>() else {
                return Ok(Transformed::no(node));
            };
            // The calls, as the plan's expression roots (its accessor is deprecated).
            let mut calls: Vec<Arc<AsyncFuncExpr>> = Vec::new();
            exec.apply_expressions(&mut |e| {
                if let Some(call) = e.downcast_ref::<AsyncFuncExpr>() {
                    calls.push(Arc::new(call.clone()));
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
            // Each call's column among the distinct calls.
            let mut kept: Vec<Arc<AsyncFuncExpr>> = Vec::new();
            let mut column_of: Vec<usize> = Vec::with_capacity(calls.len());
            for call in &calls {
                match kept
                    .iter()
                    .position(|k| k.func.as_ref() == call.func.as_ref())
                {
                    Some(k) => column_of.push(k),
                    None => {
                        column_of.push(kept.len());
                        kept.push(Arc::clone(call));
                    }
                }
            }
            let input = Arc::clone(exec.input());
            let inputs = input.schema().fields().len();
            let whole = inputs + calls.len() == exec.schema().fields().len();
            if kept.len() == calls.len() || !whole {
                return Ok(Transformed::no(node));
            }
            let distinct: Arc<dyn ExecutionPlan> =
                Arc::new(AsyncFuncExec::try_new(kept.clone(), input)?);
            let schema = distinct.schema();
            let mut columns: Vec<ProjectionExpr> = (0..inputs)
                .map(|i| {
                    let name = schema.field(i).name();
                    ProjectionExpr::new(Arc::new(Column::new(name, i)), name.clone())
                })
                .collect();
            for (call, &k) in calls.iter().zip(&column_of) {
                columns.push(ProjectionExpr::new(
                    Arc::new(Column::new(&kept[k].name, inputs + k)),
                    call.name.clone(),
                ));
            }
            let projection: Arc<dyn ExecutionPlan> =
                Arc::new(ProjectionExec::try_new(columns, distinct)?);
            Ok(Transformed::yes(projection))
        })
        .data()
    }
}

//! The kernel lab's tests, in one binary (each test binary links the whole crate): the analytic
//! roofline table ([`roofline`]) and the harness's measurements on the executor under test
//! ([`harness`]).

#[path = "../../../../tests/common/gpu.rs"]
mod gpu_common;
mod harness;
mod roofline;

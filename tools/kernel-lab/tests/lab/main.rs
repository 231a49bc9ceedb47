//! The kernel lab's tests, in one binary (each test binary links the whole crate): the analytic
//! roofline table ([`roofline`]), the harness's measurements on the executor under test
//! ([`harness`]) and the probe that Nsight Compute reads on a GPU ([`probe`]).

#[path = "../../../../tests/common/gpu.rs"]
mod gpu_common;
mod harness;
mod probe;
mod roofline;

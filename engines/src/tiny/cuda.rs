//! [`CudaBackend`]: the tiny transformer's ops as CUDA kernels (`kernels.cu`), compiled
//! at run time with NVRTC and launched through cudarc's driver API (loaded
//! dynamically: no CUDA toolkit is needed to build, only a driver and libnvrtc to run).
//!
//! Owns the CUDA context, its stream, the compiled kernels and every device buffer the
//! model holds (weights, KV caches, activations: dropping one frees its device memory).
//! Before touching the driver it checks that libcuda and libnvrtc can be loaded, and
//! reports `Unavailable` when they cannot (cudarc panics on a missing library); the
//! opening is also guarded with `catch_unwind` in case a library is there but unusable.
//!
//! This is the only module of the workspace that may use `unsafe`: launching a kernel
//! is unsafe because the driver cannot check its arguments. Every launch checks the
//! buffer sizes first, and each `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use tether_core::error::{panic_message, BackendError, EngineError, ErrorKind};

use super::backend::{Backend, Shape, Span, RMS_EPS};

/// The kernels' source (`extern "C"`, so their names are not mangled).
const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block of the element-wise kernels and of the per-row reductions (the
/// reductions' shared arrays have this size and need a power of two).
const THREADS: u32 = 256;
/// Threads per block of the attention kernel (a power of two).
const ATTENTION_THREADS: u32 = 128;
/// Shared memory a block may use without opting in, on every CUDA GPU.
const MAX_SHARED_BYTES: usize = 48 * 1024;
/// Matmul tile width (`TILE` in `kernels.cu`).
const TILE: u32 = 16;

/// Free and total memory of a CUDA device, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaMemInfo {
    /// Bytes free on the device now.
    pub free: usize,
    /// Bytes on the device.
    pub total: usize,
}

/// Free and total memory of CUDA device `ordinal`, after its pending work (frees
/// included) completed. `Unavailable` without a driver or device.
pub fn cuda_mem_info(ordinal: usize) -> Result<CudaMemInfo, EngineError> {
    check_libraries()?;
    guarded(|| {
        let ctx = open_context(ordinal)?;
        ctx.synchronize().map_err(driver)?;
        let (free, total) = ctx.mem_get_info().map_err(driver)?;
        Ok(CudaMemInfo { free, total })
    })
}

fn unavailable(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Unavailable, message)
}

fn driver(error: DriverError) -> EngineError {
    EngineError::new(
        ErrorKind::Backend(BackendError::Unknown),
        format!("cuda driver error: {error}"),
    )
}

/// Whether the driver library and NVRTC can be loaded, by the very names and search
/// paths (`LD_LIBRARY_PATH`, the loader cache) cudarc uses.
fn check_libraries() -> Result<(), EngineError> {
    // SAFETY: `is_culib_present` only tries `dlopen` on cudarc's candidate names for
    // libcuda and closes what it opened; loading the driver library runs its
    // initialisers, which any use of this backend does anyway. No CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "no CUDA driver: libcuda.so could not be loaded (is an NVIDIA driver installed?)",
        ));
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "no NVRTC: libnvrtc.so could not be loaded (install the CUDA runtime compiler \
             and put its directory on LD_LIBRARY_PATH)",
        ));
    }
    Ok(())
}

/// Run `f`, turning a cudarc panic (a library that loads but lacks a symbol, say) into
/// an `Unavailable` error.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(unavailable(format!(
            "the CUDA libraries are unusable: {}",
            panic_message(&*panic)
        )))
    })
}

fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, EngineError> {
    let count = CudaContext::device_count()
        .map_err(|e| unavailable(format!("the CUDA driver did not start: {e}")))?;
    if ordinal >= usize::try_from(count).unwrap_or(0) {
        return Err(unavailable(format!(
            "no CUDA device {ordinal} ({count} found)"
        )));
    }
    CudaContext::new(ordinal).map_err(|e| unavailable(format!("cuda device {ordinal}: {e}")))
}

struct Kernels {
    embed: CudaFunction,
    matmul: CudaFunction,
    rmsnorm: CudaFunction,
    rope: CudaFunction,
    kv_write: CudaFunction,
    attention: CudaFunction,
    add: CudaFunction,
    silu_mul: CudaFunction,
    gather_rows: CudaFunction,
    argmax: CudaFunction,
}

/// The CUDA backend: buffers are device slices on one stream.
pub(crate) struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
    /// Where `argmax` writes, grown as needed.
    argmax_out: Option<CudaSlice<u32>>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Open device `ordinal`, compile the kernels and check them on a small input.
    /// `Unavailable` when the driver, NVRTC or the device is missing.
    pub(crate) fn new(ordinal: usize, max_context: usize) -> Result<CudaBackend, EngineError> {
        let shared = (ATTENTION_THREADS as usize + max_context) * std::mem::size_of::<f32>();
        if shared > MAX_SHARED_BYTES {
            return Err(EngineError::invalid_argument(format!(
                "max_context {max_context} is too long for the cuda attention kernel"
            )));
        }
        check_libraries()?;
        guarded(|| CudaBackend::open(ordinal))
    }

    fn open(ordinal: usize) -> Result<CudaBackend, EngineError> {
        let ctx = open_context(ordinal)?;
        let name = ctx.name().map_or_else(
            |_| format!("cuda:{ordinal}"),
            |n| format!("cuda:{ordinal} ({n})"),
        );
        let ptx = compile_ptx_with_opts(KERNELS, CompileOptions::default()).map_err(|e| {
            let detail = match &e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => other.to_string(),
            };
            unavailable(format!("nvrtc could not compile the kernels: {detail}"))
        })?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| unavailable(format!("the driver could not load the kernels: {e}")))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| unavailable(format!("kernel `{name}` is missing: {e}")))
        };
        let kernels = Kernels {
            embed: f("embed")?,
            matmul: f("matmul")?,
            rmsnorm: f("rmsnorm")?,
            rope: f("rope")?,
            kv_write: f("kv_write")?,
            attention: f("attention")?,
            add: f("add")?,
            silu_mul: f("silu_mul")?,
            gather_rows: f("gather_rows")?,
            argmax: f("argmax")?,
        };
        let mut backend = CudaBackend {
            stream: ctx.default_stream(),
            kernels,
            name,
            argmax_out: None,
        };
        // A launch and two copies end to end, so a broken setup fails here, typed.
        let probe = backend.upload(&[1.0, 3.0, 3.0, 2.0])?;
        let best = backend.argmax(&probe, 1, 4)?;
        if best != [1] {
            return Err(unavailable(format!(
                "the CUDA kernels gave a wrong answer on a probe ({best:?}, expected [1])"
            )));
        }
        Ok(backend)
    }
}

/// `n` as a kernel `int`.
fn int(n: usize) -> Result<i32, EngineError> {
    i32::try_from(n).map_err(|_| EngineError::invalid_argument(format!("size {n} is too large")))
}

/// Check that a buffer of `len` elements holds the `need` an op touches: what makes
/// each launch below sound.
fn fits(len: usize, need: usize, what: &str) -> Result<(), EngineError> {
    if len >= need {
        Ok(())
    } else {
        Err(EngineError::new(
            ErrorKind::Backend(BackendError::Unknown),
            format!("{what} holds {len} elements, the op needs {need}"),
        ))
    }
}

fn blocks_for(n: usize) -> Result<LaunchConfig, EngineError> {
    let n = u32::try_from(n.max(1))
        .map_err(|_| EngineError::invalid_argument(format!("size {n} is too large")))?;
    Ok(LaunchConfig {
        grid_dim: (n.div_ceil(THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn per_row(rows: usize) -> Result<LaunchConfig, EngineError> {
    let rows = u32::try_from(rows)
        .map_err(|_| EngineError::invalid_argument(format!("{rows} rows is too many")))?;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<u32>;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn upload(&mut self, data: &[f32]) -> Result<CudaSlice<f32>, EngineError> {
        self.stream.clone_htod(data).map_err(driver)
    }

    fn zeros(&mut self, len: usize) -> Result<CudaSlice<f32>, EngineError> {
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(driver)
    }

    fn upload_ids(&mut self, ids: &[u32]) -> Result<CudaSlice<u32>, EngineError> {
        if ids.is_empty() {
            return self.stream.alloc_zeros::<u32>(1).map_err(driver);
        }
        self.stream.clone_htod(ids).map_err(driver)
    }

    fn download(&mut self, buf: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, EngineError> {
        fits(buf.len(), len, "download source")?;
        self.stream.clone_dtoh(&buf.slice(..len)).map_err(driver)
    }

    fn embed(
        &mut self,
        table: &CudaSlice<f32>,
        tokens: &CudaSlice<u32>,
        rows: usize,
        d: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        fits(out.len(), rows * d, "embed output")?;
        fits(tokens.len(), rows, "embed tokens")?;
        let (rows_i, d_i) = (int(rows)?, int(d)?);
        let cfg = blocks_for(rows * d)?;
        let mut launch = self.stream.launch_builder(&self.kernels.embed);
        launch
            .arg(out)
            .arg(table)
            .arg(tokens)
            .arg(&rows_i)
            .arg(&d_i);
        // SAFETY: the arguments match `embed(float*, const float*, const unsigned*, int,
        // int)`; `out` holds rows*d floats and `tokens` rows ids (checked above); every id
        // is below the vocabulary (the model checks tokens before a step), so each read
        // stays in the vocab*d `table`.
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        fits(x.len(), rows * k, "matmul input")?;
        fits(w.len(), k * n, "matmul weight")?;
        fits(out.len(), rows * n, "matmul output")?;
        let (rows_i, k_i, n_i) = (int(rows)?, int(k)?, int(n)?);
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(n)
                    .map_err(|_| EngineError::invalid_argument("matmul too wide"))?
                    .div_ceil(TILE),
                u32::try_from(rows)
                    .map_err(|_| EngineError::invalid_argument("matmul too tall"))?
                    .div_ceil(TILE),
                1,
            ),
            block_dim: (TILE, TILE, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.kernels.matmul);
        launch
            .arg(out)
            .arg(x)
            .arg(w)
            .arg(&rows_i)
            .arg(&k_i)
            .arg(&n_i);
        // SAFETY: the arguments match `matmul(float*, const float*, const float*, int,
        // int, int)`; the kernel reads x[rows*k] and w[k*n] and writes out[rows*n] only
        // inside those bounds, and the three buffers are at least that long (checked
        // above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn rmsnorm(
        &mut self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        fits(x.len(), rows * d, "rmsnorm input")?;
        fits(weight.len(), d, "rmsnorm weight")?;
        fits(out.len(), rows * d, "rmsnorm output")?;
        let (rows_i, d_i, eps) = (int(rows)?, int(d)?, RMS_EPS);
        let cfg = per_row(rows)?;
        let mut launch = self.stream.launch_builder(&self.kernels.rmsnorm);
        launch
            .arg(out)
            .arg(x)
            .arg(weight)
            .arg(&rows_i)
            .arg(&d_i)
            .arg(&eps);
        // SAFETY: the arguments match `rmsnorm(float*, const float*, const float*, int,
        // int, float)`; one 256-thread block per row (the size of its shared array)
        // touches row r < rows of x and out and d weights, all in bounds (checked above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn rope(
        &mut self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        rows: usize,
        shape: &Shape,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        let half = shape.head_dim / 2;
        fits(x.len(), rows * shape.d_model, "rope input")?;
        fits(positions.len(), rows, "rope positions")?;
        fits(cos.len(), shape.max_context * half, "rope cos table")?;
        fits(sin.len(), shape.max_context * half, "rope sin table")?;
        let (rows_i, d_i, hd_i) = (int(rows)?, int(shape.d_model)?, int(shape.head_dim)?);
        let cfg = blocks_for(rows * shape.d_model / 2)?;
        let mut launch = self.stream.launch_builder(&self.kernels.rope);
        launch
            .arg(x)
            .arg(positions)
            .arg(cos)
            .arg(sin)
            .arg(&rows_i)
            .arg(&d_i)
            .arg(&hd_i);
        // SAFETY: the arguments match `rope(float*, const unsigned*, const float*, const
        // float*, int, int, int)`; each thread touches one pair inside row r < rows of x,
        // and every position is below max_context (the model only feeds positions inside
        // a sequence's cache, which is at most max_context long), so the table reads stay
        // inside the max_context*head_dim/2 tables (checked above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn attention(
        &mut self,
        kv: &mut CudaSlice<f32>,
        layer: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        span: Span,
        shape: &Shape,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        let d = shape.d_model;
        let end_row = (span.row0 + span.rows) * d;
        let end_pos = span.pos0 + span.rows;
        fits(span.capacity, end_pos, "kv cache rows")?;
        fits(kv.len(), shape.kv_len(span.capacity), "kv cache")?;
        fits(q.len(), end_row, "attention queries")?;
        fits(k.len(), end_row, "attention keys")?;
        fits(v.len(), end_row, "attention values")?;
        fits(out.len(), end_row, "attention output")?;
        if layer >= shape.layers {
            return Err(EngineError::invalid_argument(format!("no layer {layer}")));
        }
        let k_off = shape.kv_offset(span.capacity, layer, false) as u64;
        let v_off = shape.kv_offset(span.capacity, layer, true) as u64;
        let (row0, rows, pos0, d_i, hd) = (
            int(span.row0)?,
            int(span.rows)?,
            int(span.pos0)?,
            int(d)?,
            int(shape.head_dim)?,
        );

        let cfg = blocks_for(span.rows * d)?;
        let mut launch = self.stream.launch_builder(&self.kernels.kv_write);
        launch
            .arg(&mut *kv)
            .arg(k)
            .arg(v)
            .arg(&k_off)
            .arg(&v_off)
            .arg(&row0)
            .arg(&rows)
            .arg(&pos0)
            .arg(&d_i);
        // SAFETY: the arguments match `kv_write(float*, const float*, const float*,
        // unsigned long long, unsigned long long, int, int, int, int)`; it reads rows
        // row0..row0+rows of k and v (in bounds, checked above) and writes positions
        // pos0..pos0+rows < capacity of this layer's key and value blocks, which lie
        // inside the kv buffer of kv_len(capacity) floats (checked above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;

        let shared = (ATTENTION_THREADS as usize + end_pos) * std::mem::size_of::<f32>();
        fits(MAX_SHARED_BYTES, shared, "attention shared memory")?;
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(shape.heads)
                    .map_err(|_| EngineError::invalid_argument("too many heads"))?,
                u32::try_from(span.rows)
                    .map_err(|_| EngineError::invalid_argument("too many rows"))?,
                1,
            ),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: u32::try_from(shared)
                .map_err(|_| EngineError::invalid_argument("context too long"))?,
        };
        let mut launch = self.stream.launch_builder(&self.kernels.attention);
        launch
            .arg(out)
            .arg(q)
            .arg(&*kv)
            .arg(&k_off)
            .arg(&v_off)
            .arg(&row0)
            .arg(&pos0)
            .arg(&d_i)
            .arg(&hd)
            .arg(&scale);
        // SAFETY: the arguments match `attention(float*, const float*, const float*,
        // unsigned long long, unsigned long long, int, int, int, int, float)`; block
        // (h, i) reads row row0+i of q, cache positions 0..=pos0+i (< capacity) of head h
        // of this layer, and writes head h of row row0+i of out, all in bounds (checked
        // above); its dynamic shared memory holds the 128 reduction slots plus
        // pos0+rows scores, and stays under the 48 KiB every GPU grants.
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn add(
        &mut self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        len: usize,
    ) -> Result<(), EngineError> {
        fits(x.len(), len, "add target")?;
        fits(y.len(), len, "add source")?;
        let n = int(len)?;
        let cfg = blocks_for(len)?;
        let mut launch = self.stream.launch_builder(&self.kernels.add);
        launch.arg(x).arg(y).arg(&n);
        // SAFETY: the arguments match `add(float*, const float*, int)`; it touches the
        // first len elements of both buffers, which hold at least that (checked above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn silu_mul(
        &mut self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        len: usize,
    ) -> Result<(), EngineError> {
        fits(gate.len(), len, "silu_mul gate")?;
        fits(up.len(), len, "silu_mul up")?;
        let n = int(len)?;
        let cfg = blocks_for(len)?;
        let mut launch = self.stream.launch_builder(&self.kernels.silu_mul);
        launch.arg(gate).arg(up).arg(&n);
        // SAFETY: the arguments match `silu_mul(float*, const float*, int)`; it touches
        // the first len elements of both buffers, which hold at least that (checked
        // above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn gather_rows(
        &mut self,
        x: &CudaSlice<f32>,
        rows: &CudaSlice<u32>,
        count: usize,
        d: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), EngineError> {
        fits(out.len(), count * d, "gather output")?;
        fits(rows.len(), count, "gather rows")?;
        let (count_i, d_i) = (int(count)?, int(d)?);
        let cfg = blocks_for(count * d)?;
        let mut launch = self.stream.launch_builder(&self.kernels.gather_rows);
        launch.arg(out).arg(x).arg(rows).arg(&count_i).arg(&d_i);
        // SAFETY: the arguments match `gather_rows(float*, const float*, const unsigned*,
        // int, int)`; it writes count*d floats of out (checked above) and reads rows the
        // model names, each the last row of a segment of this step, so inside x.
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn argmax(
        &mut self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<Vec<u32>, EngineError> {
        fits(logits.len(), rows * vocab, "argmax logits")?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if self.argmax_out.as_ref().is_none_or(|o| o.len() < rows) {
            self.argmax_out = None;
            let grown = self
                .stream
                .alloc_zeros::<u32>(rows.next_power_of_two())
                .map_err(driver)?;
            self.argmax_out = Some(grown);
        }
        let out = self
            .argmax_out
            .as_mut()
            .expect("argmax output was just ensured");
        let (rows_i, vocab_i) = (int(rows)?, int(vocab)?);
        let cfg = per_row(rows)?;
        let mut launch = self.stream.launch_builder(&self.kernels.argmax);
        launch.arg(&mut *out).arg(logits).arg(&rows_i).arg(&vocab_i);
        // SAFETY: the arguments match `argmax(unsigned*, const float*, int, int)`; one
        // 256-thread block per row (the size of its shared arrays) reads its row of
        // logits and writes out[r], r < rows, both in bounds (checked above).
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        self.stream.clone_dtoh(&out.slice(..rows)).map_err(driver)
    }
}

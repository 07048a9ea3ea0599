//! The candle ops behind [`super::attention`], [`super::in_proj`] and [`super::out_accum`]:
//! raw device pointers into candle's buffers, cuBLAS with explicit leading dimensions for the
//! width slices, and the kernels of `kernels.cu` for attention and the epilogues. Everything
//! runs on candle's stream, so ordering with candle's own kernels needs no extra events.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp3, DType, InplaceOp3, Layout,
    Result, Shape, Storage, Tensor,
};

use super::super::config::Activation;
use super::super::kernels::linear::check_groups;
use super::super::kernels::RowGroup;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mone_kernels.fatbin"));

/// A kernel of `kernels.cu` on `dev`, loading the module once per device (candle's own module
/// cache takes PTX text only, and the fatbin is binary).
fn kernel(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    type Modules = HashMap<DeviceId, Arc<CudaModule>>;
    static MODULES: OnceLock<Mutex<Modules>> = OnceLock::new();
    let mut mods = MODULES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("CUDA module cache poisoned".into()))?;
    let m = match mods.get(&dev.id()) {
        Some(m) => m.clone(),
        None => {
            let m = dev
                .cuda_stream()
                .context()
                .load_module(Ptx::from_binary(FATBIN.to_vec()))
                .w()?;
            mods.insert(dev.id(), m.clone());
            m
        }
    };
    m.load_function(name).w()
}

/// Head dimensions the attention kernel is instantiated for (`kernels.cu`).
pub const HEAD_DIMS: [usize; 7] = [16, 24, 32, 48, 64, 96, 128];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dt {
    F32,
    Bf16,
    F16,
}

impl Dt {
    fn of(d: DType) -> Result<Self> {
        match d {
            DType::F32 => Ok(Self::F32),
            DType::BF16 => Ok(Self::Bf16),
            DType::F16 => Ok(Self::F16),
            d => bail!("mone's CUDA kernels take f32, bf16 or f16, not {d:?}"),
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
    fn size(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
    fn blas_type(self) -> sys::cudaDataType {
        match self {
            Self::F32 => sys::cudaDataType::CUDA_R_32F,
            Self::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Self::F16 => sys::cudaDataType::CUDA_R_16F,
        }
    }
    /// f32 accumulation for every type; TF32 or bf16 reduced-precision reductions only where
    /// candle's own switches allow them, so both paths round the same way.
    fn compute(self) -> sys::cublasComputeType_t {
        use candle_core::cuda_backend as cb;
        match self {
            Self::F32 if cb::gemm_reduced_precision_f32() => {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            }
            Self::Bf16 if cb::gemm_reduced_precision_bf16() => {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF
            }
            _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        }
    }
}

/// A device address in a candle buffer (the layout's start offset applied) and the guard that
/// records the use on the stream when dropped.
struct Ptr<'a> {
    addr: u64,
    _guard: SyncOnDrop<'a>,
}

fn read<'a>(s: &'a CudaStorage, l: &Layout, stream: &'a CudaStream) -> Result<Ptr<'a>> {
    fn at<'a, T>(v: &'a CudaSlice<T>, st: &'a CudaStream, off: usize, size: u64) -> Ptr<'a> {
        let (addr, g) = v.device_ptr(st);
        Ptr {
            addr: addr + off as u64 * size,
            _guard: g,
        }
    }
    let off = l.start_offset();
    Ok(match &s.slice {
        CudaStorageSlice::F32(v) => at(v, stream, off, 4),
        CudaStorageSlice::BF16(v) => at(v, stream, off, 2),
        CudaStorageSlice::F16(v) => at(v, stream, off, 2),
        _ => bail!(
            "mone's CUDA kernels take f32, bf16 or f16, not {:?}",
            s.dtype()
        ),
    })
}

fn write<'a>(s: &'a mut CudaStorage, l: &Layout, stream: &'a CudaStream) -> Result<Ptr<'a>> {
    fn at<'a, T>(v: &'a mut CudaSlice<T>, st: &'a CudaStream, off: usize, size: u64) -> Ptr<'a> {
        let (addr, g) = v.device_ptr_mut(st);
        Ptr {
            addr: addr + off as u64 * size,
            _guard: g,
        }
    }
    let off = l.start_offset();
    let dt = s.dtype();
    Ok(match &mut s.slice {
        CudaStorageSlice::F32(v) => at(v, stream, off, 4),
        CudaStorageSlice::BF16(v) => at(v, stream, off, 2),
        CudaStorageSlice::F16(v) => at(v, stream, off, 2),
        _ => bail!("mone's CUDA kernels take f32, bf16 or f16, not {dt:?}"),
    })
}

fn alloc(dev: &CudaDevice, dt: Dt, n: usize) -> Result<CudaStorage> {
    // SAFETY: every caller writes all n elements (GEMMs with beta = 0 over a partition of the
    // rows, or the attention kernel over every row) before anything reads them.
    unsafe {
        Ok(match dt {
            Dt::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            Dt::Bf16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            Dt::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
        })
    }
}

/// (rows, cols, row stride) of a 2-d layout whose rows are contiguous.
fn rows2(l: &Layout, name: &str) -> Result<(usize, usize, usize)> {
    match (l.dims(), l.stride()) {
        ([r, c], [rs, 1]) => Ok((*r, *c, *rs)),
        ([r, 1], [rs, _]) => Ok((*r, 1, *rs)),
        (d, s) => bail!("{name}: expected a 2-d tensor with contiguous rows, got {d:?} / {s:?}"),
    }
}

fn contiguous1(l: &Layout, n: usize, name: &str) -> Result<()> {
    if l.shape().elem_count() != n || !l.is_contiguous() {
        bail!("{name}: expected {n} contiguous values, got {:?}", l.dims());
    }
    Ok(())
}

/// C (m x n, column-major, ldc) = A^T B + beta C for A stored k x m (lda) and B k x n (ldb),
/// column-major: with row-major weights and activations, Y[rows, :m] = X[rows, :k] W[:m, :k]^T.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_tn(
    blas_h: &CudaBlas,
    dt: Dt,
    (m, n, k): (usize, usize, usize),
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
    beta: f32,
) -> Result<()> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let alpha = 1f32;
    let int =
        |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} > i32")));
    blas::gemm_ex(
        *blas_h.handle(),
        sys::cublasOperation_t::CUBLAS_OP_T,
        sys::cublasOperation_t::CUBLAS_OP_N,
        int(m)?,
        int(n)?,
        int(k)?,
        &alpha as *const f32 as *const c_void,
        a as *const c_void,
        dt.blas_type(),
        int(lda)?,
        b as *const c_void,
        dt.blas_type(),
        int(ldb)?,
        &beta as *const f32 as *const c_void,
        c as *mut c_void,
        dt.blas_type(),
        int(ldc)?,
        dt.compute(),
        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
    )
    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

fn grid_1d(total: usize) -> LaunchConfig {
    let block = 256u32;
    let blocks = total.div_ceil(block as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An optional per-row scale tensor's device address (0 for none), checked to hold `rows`
/// values of `dt`.
struct Scale<'a>(Option<(candle_core::StorageRef<'a>, &'a Layout)>);

impl<'a> Scale<'a> {
    fn of(t: Option<&'a Tensor>, rows: usize, dt: DType, name: &str) -> Result<Self> {
        let Some(t) = t else {
            return Ok(Self(None));
        };
        if t.dtype() != dt {
            bail!(
                "{name}: row scale is {:?}, the activations {dt:?}",
                t.dtype()
            );
        }
        let (s, l) = t.storage_and_layout();
        contiguous1(l, rows, name)?;
        Ok(Self(Some((s, l))))
    }
    fn ptr<'b>(&'b self, stream: &'b CudaStream) -> Result<Option<Ptr<'b>>> {
        match &self.0 {
            Some((s, l)) => match &**s {
                Storage::Cuda(c) => Ok(Some(read(c, l, stream)?)),
                _ => bail!("row scale is not on the GPU"),
            },
            None => Ok(None),
        }
    }
}

/// Fused multi-head attention over a (rows, 3D) QKV buffer; see `kernels.cu`.
pub struct Attention {
    pub n: usize,
    pub s: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub token_major: bool,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "mone-cuda-attention"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("mone-cuda-attention runs on CUDA only")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, cols, ld) = rows2(l, self.name())?;
        let d = self.heads * self.head_dim;
        if rows != self.n * self.s || cols != 3 * d {
            bail!(
                "{}: qkv is {rows} x {cols}, expected {} x {}",
                self.name(),
                self.n * self.s,
                3 * d
            );
        }
        if self.s > 65_535 || self.heads > 65_535 {
            bail!(
                "{}: {} sequences x {} heads exceed the grid",
                self.name(),
                self.s,
                self.heads
            );
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            bail!("{}: no kernel for head dim {}", self.name(), self.head_dim);
        }
        let dt = Dt::of(s.dtype())?;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let mut out = alloc(&dev, dt, rows * d)?;
        if rows == 0 {
            return Ok((out, Shape::from((rows, d))));
        }
        let name = format!("attention_{}_{}", dt.suffix(), self.head_dim);
        let f = kernel(&dev, &name)?;
        {
            let qkv = read(s, l, &stream)?;
            let o = write(&mut out, &Layout::contiguous((rows, d)), &stream)?;
            let block = 64u32;
            let cfg = LaunchConfig {
                grid_dim: (
                    self.n.div_ceil(block as usize) as u32,
                    self.heads as u32,
                    self.s as u32,
                ),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n, sq, h, tm) = (
                self.n as i32,
                self.s as i32,
                self.heads as i32,
                self.token_major as i32,
            );
            let (ld_in, ld_out) = (ld as i64, d as i64);
            let scale = 1f32 / (self.head_dim as f32).sqrt();
            let mut b = stream.launch_builder(&f);
            b.arg(&qkv.addr)
                .arg(&o.addr)
                .arg(&n)
                .arg(&sq)
                .arg(&h)
                .arg(&tm);
            b.arg(&ld_in).arg(&ld_out).arg(&scale);
            // SAFETY: the pointers address rows * ld and rows * d elements of dt, as checked.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((out, Shape::from((rows, d))))
    }
}

fn act_code(a: Option<Activation>) -> i32 {
    match a {
        None => 0,
        Some(Activation::GeluTanh) => 1,
        Some(Activation::GeluErf) => 2,
    }
}

/// y[g rows] = x[g rows, :width_g] W[:, :width_g]^T, then y = s_r * act(y + b), for
/// (x, W, b); the scale (rows) is optional.
pub struct InProj<'a> {
    pub groups: &'a [RowGroup],
    pub act: Option<Activation>,
    pub scale: Option<&'a Tensor>,
}

impl CustomOp3 for InProj<'_> {
    fn name(&self) -> &'static str {
        "mone-cuda-nested-in-proj"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let name = self.name();
        let (rows, k, ldx) = rows2(xl, name)?;
        let (n_out, wk, ldw) = rows2(wl, name)?;
        if wk != k {
            bail!("{name}: x has {k} features, the weight {wk}");
        }
        contiguous1(bl, n_out, name)?;
        check_groups(name, self.groups, rows, k)?;
        let dt = Dt::of(xs.dtype())?;
        if ws.dtype() != xs.dtype() || bs.dtype() != xs.dtype() {
            bail!("{name}: x, weight and bias differ in dtype");
        }
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let scale = Scale::of(self.scale, rows, xs.dtype(), name)?;
        let mut out = alloc(&dev, dt, rows * n_out)?;
        {
            let blas_h = dev.cublas_handle();
            let (x, w, b) = (
                read(xs, xl, &stream)?,
                read(ws, wl, &stream)?,
                read(bs, bl, &stream)?,
            );
            let y = write(&mut out, &Layout::contiguous((rows, n_out)), &stream)?;
            for g in self.groups {
                // SAFETY: the group's rows and width lie inside x, W and y (checked above).
                unsafe {
                    gemm_tn(
                        &blas_h,
                        dt,
                        (n_out, g.rows, g.width),
                        w.addr,
                        ldw,
                        x.addr + (g.row0 * ldx) as u64 * dt.size(),
                        ldx,
                        y.addr + (g.row0 * n_out) as u64 * dt.size(),
                        n_out,
                        0.0,
                    )?;
                }
            }
            let sp = scale.ptr(&stream)?;
            let s_addr = sp.as_ref().map_or(0u64, |p| p.addr);
            let f = kernel(&dev, &format!("bias_act_{}", dt.suffix()))?;
            let (r, c, ld, a) = (rows as i64, n_out as i32, n_out as i64, act_code(self.act));
            let mut lb = stream.launch_builder(&f);
            lb.arg(&y.addr)
                .arg(&b.addr)
                .arg(&s_addr)
                .arg(&r)
                .arg(&c)
                .arg(&ld)
                .arg(&a);
            // SAFETY: y holds rows x n_out, b n_out and the scale rows values.
            unsafe { lb.launch(grid_1d(rows * n_out)) }.w()?;
        }
        Ok((out, Shape::from((rows, n_out))))
    }
}

/// In place on the residual x (rows, D): x[g rows, :width_g] += a[g rows] W[:width_g]^T +
/// s_r * b[:width_g], for (x; a, W) with the bias and optional row scale as fields. The scale
/// multiplies only the bias: the caller scales a (fc1's epilogue) so that the product carries it.
pub struct OutAccum<'a> {
    pub groups: &'a [RowGroup],
    pub bias: &'a Tensor,
    pub scale: Option<&'a Tensor>,
}

impl InplaceOp3 for OutAccum<'_> {
    fn name(&self) -> &'static str {
        "mone-cuda-nested-out-accum"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("{} runs on CUDA only", self.name())
    }
    fn cuda_fwd(
        &self,
        xs: &mut CudaStorage,
        xl: &Layout,
        as_: &CudaStorage,
        al: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let (rows, d, ldx) = rows2(xl, name)?;
        let (arows, k, lda) = rows2(al, name)?;
        let (wd, wk, ldw) = rows2(wl, name)?;
        if arows != rows || wd != d || wk != k {
            bail!("{name}: x {rows} x {d}, a {arows} x {k}, weight {wd} x {wk} do not fit");
        }
        check_groups(name, self.groups, rows, d)?;
        let dt = Dt::of(xs.dtype())?;
        if as_.dtype() != xs.dtype() || ws.dtype() != xs.dtype() || self.bias.dtype() != xs.dtype()
        {
            bail!("{name}: x, a, weight and bias differ in dtype");
        }
        let (bst, bl) = self.bias.storage_and_layout();
        contiguous1(bl, d, name)?;
        let Storage::Cuda(bst) = &*bst else {
            bail!("{name}: the bias is not on the GPU")
        };
        let scale = Scale::of(self.scale, rows, xs.dtype(), name)?;
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let blas_h = dev.cublas_handle();
        let f = kernel(&dev, &format!("add_bias_rows_{}", dt.suffix()))?;
        let (a, w, b) = (
            read(as_, al, &stream)?,
            read(ws, wl, &stream)?,
            read(bst, bl, &stream)?,
        );
        let sp = scale.ptr(&stream)?;
        let x = write(xs, xl, &stream)?;
        for g in self.groups {
            let x_g = x.addr + (g.row0 * ldx) as u64 * dt.size();
            let s_g = sp
                .as_ref()
                .map_or(0u64, |p| p.addr + g.row0 as u64 * dt.size());
            let (r, wdt, ld) = (g.rows as i64, g.width as i32, ldx as i64);
            let mut lb = stream.launch_builder(&f);
            lb.arg(&x_g)
                .arg(&b.addr)
                .arg(&s_g)
                .arg(&r)
                .arg(&wdt)
                .arg(&ld);
            // SAFETY: the group's rows x width lie inside x; b has d >= width values and the
            // scale rows values.
            unsafe { lb.launch(grid_1d(g.rows * g.width)) }.w()?;
            // SAFETY: as above for a (rows x k) and W (d x k), width <= d.
            unsafe {
                gemm_tn(
                    &blas_h,
                    dt,
                    (g.width, g.rows, k),
                    w.addr,
                    ldw,
                    a.addr + (g.row0 * lda) as u64 * dt.size(),
                    lda,
                    x_g,
                    ldx,
                    1.0,
                )?;
            }
        }
        Ok(())
    }
}

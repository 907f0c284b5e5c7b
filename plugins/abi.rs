//! The ABI 1 exports (docs/plugins.md): `llm_policy_manifest`, `llm_policy_alloc` and
//! `llm_policy_evaluate`; `memory` is exported by the toolchain. Shared by every plugin here
//! (`#[path = "../../abi.rs"] mod abi;`): it binds the crate's `MANIFEST` and `evaluate`. A plugin
//! of your own copies it unchanged.
//!
//! The host makes a fresh instance for every call, so nothing here is ever freed: buffers are
//! leaked and the instance's memory goes away with it.

/// `(ptr << 32) | len` of a buffer in linear memory (wasm32 pointers and lengths fit in 32 bits).
fn pack(bytes: &[u8]) -> i64 {
    let ptr = bytes.as_ptr() as usize as u64;
    let len = bytes.len() as u64;
    ((ptr << 32) | (len & 0xffff_ffff)) as i64
}

/// The manifest JSON: `(ptr << 32) | len`.
#[no_mangle]
pub extern "C" fn llm_policy_manifest() -> i64 {
    pack(crate::MANIFEST.as_bytes())
}

/// `len` writable bytes for the input; 0 when `len` is negative.
#[no_mangle]
pub extern "C" fn llm_policy_alloc(len: i32) -> i32 {
    match usize::try_from(len) {
        Ok(len) => Vec::leak(vec![0u8; len]).as_mut_ptr() as usize as i32,
        Err(_) => 0,
    }
}

/// Evaluates the input JSON at `ptr`/`len`; returns the output JSON as `(ptr << 32) | len`.
#[no_mangle]
pub extern "C" fn llm_policy_evaluate(ptr: i32, len: i32) -> i64 {
    let len = usize::try_from(len).unwrap_or(0);
    let input: &[u8] = if ptr == 0 || len == 0 {
        &[]
    } else {
        // SAFETY: the host wrote `len` bytes at `ptr`, a buffer it got from
        // `llm_policy_alloc(len)`; nothing else refers to that (leaked) buffer.
        unsafe { core::slice::from_raw_parts(ptr as u32 as usize as *const u8, len) }
    };
    pack(Vec::leak(crate::evaluate(input)))
}

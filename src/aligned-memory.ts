/**
 * Page-aligned memory for O_DIRECT, which needs the buffer's address aligned to the disk's logical block
 * size. Node gives no say over a Buffer's address, but a WebAssembly.Memory starts on a page boundary.
 */

/** Alignment of address, offset and length for O_DIRECT: a page, which covers 512- and 4096-byte sectors. */
export const DIRECT_ALIGN = 4096;
const WASM_PAGE = 65536;

/** The one WebAssembly API used (the project's TypeScript libs do not declare WebAssembly). */
const wasm = (globalThis as { WebAssembly?: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } } })
  .WebAssembly;

/** At least `bytes` of memory starting on a page boundary, or undefined without WebAssembly (node --jitless). */
export function pageAlignedMemory(bytes: number): ArrayBuffer | undefined {
  try {
    return wasm && new wasm.Memory({ initial: Math.max(1, Math.ceil(bytes / WASM_PAGE)) }).buffer;
  } catch {
    return undefined;
  }
}

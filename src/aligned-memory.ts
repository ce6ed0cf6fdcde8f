/**
 * Page-aligned memory for O_DIRECT, which needs the buffer's address aligned to the disk's logical block
 * size. Node gives no say over a Buffer's address, but a WebAssembly.Memory starts on a page boundary.
 */

/** Alignment of address, offset and length for O_DIRECT: a page, which covers 512- and 4096-byte sectors. */
export const DIRECT_ALIGN = 4096;
const WASM_PAGE = 65536;

/** The one WebAssembly API used (the project's TypeScript libs do not declare WebAssembly). */
const wasm = (
  globalThis as {
    WebAssembly?: {
      Memory: new (d: { initial: number; maximum?: number; shared?: boolean }) => { buffer: ArrayBuffer };
    };
  }
).WebAssembly;

/**
 * At least `bytes` of memory starting on a page boundary, or undefined without WebAssembly (node --jitless).
 * `shared` makes it a SharedArrayBuffer, which worker threads can use where it lies.
 */
export function pageAlignedMemory(bytes: number, shared = false): ArrayBuffer | SharedArrayBuffer | undefined {
  try {
    const pages = Math.max(1, Math.ceil(bytes / WASM_PAGE));
    return wasm && new wasm.Memory({ initial: pages, ...(shared ? { maximum: pages, shared } : {}) }).buffer;
  } catch {
    return undefined;
  }
}

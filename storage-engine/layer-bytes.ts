/**
 * Reading a layer's file, for the engine and for readers outside it that hold their own descriptors (the
 * data plane's I/O threads). Kept free of other engine modules so a worker thread can load it alone.
 */
import fs from 'node:fs';

/**
 * Reads `length` bytes at byte `position` of the layer file open as `fd` into `target` at `targetOffset`.
 * A layer is a sparse file that reads short past its end: those bytes are holes, and holes are zeros.
 */
export function readLayerBytes(
  fd: number,
  target: Uint8Array,
  targetOffset: number,
  length: number,
  position: number,
): void {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, target, targetOffset + done, length - done, position + done);
    if (n === 0) {
      target.fill(0, targetOffset + done, targetOffset + length);
      return;
    }
    done += n;
  }
}

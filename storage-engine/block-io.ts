/**
 * Block I/O over one chain: reads through the chain's location index, and for a volume, writes and trims
 * into its head. Cost does not depend on the chain's length (invariant 10): a read is one index lookup per
 * stretch of blocks with one owner, and a partial write copies its block up from the one layer that holds it.
 */
import type { ChangedBlocks } from './direct-io.js';
import type { Layer } from './layer.js';
import type { LocationIndex } from './location-index.js';

export class BlockIo {
  constructor(
    /** The chain's top layer: a volume's live head, or a snapshot's frozen layer. */
    private top: Layer,
    readonly index: LocationIndex<Layer>,
    readonly blockSize: number,
  ) {}

  get head(): Layer {
    return this.top;
  }

  /** A snapshot or clone froze the head and put a new, empty one on top: the index stays as it is. */
  replaceHead(head: Layer): void {
    this.top = head;
  }

  /** An I/O view of the same content over another head (a clone's), with its own copy of the index. */
  cloneOnto(head: Layer): BlockIo {
    return new BlockIo(head, this.index.clone(), this.blockSize);
  }

  /** Reads [offset, offset + length) as bytes; unwritten and trimmed blocks read as zeros. */
  read(offset: number, length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    this.readInto(offset, out, 0, length);
    return out;
  }

  /** Reads [offset, offset + length) into `target` at `targetOffset`: one pread a stretch of one owner. */
  readInto(offset: number, target: Uint8Array, targetOffset: number, length: number): void {
    const B = this.blockSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const { owner, end: stretchEnd } = this.index.lookup(Math.floor(pos / B));
      const segmentEnd = Math.min(end, stretchEnd * B);
      const at = targetOffset + (pos - offset);
      if (owner) owner.readInto(target, at, segmentEnd - pos, pos);
      else target.fill(0, at, at + (segmentEnd - pos));
      pos = segmentEnd;
    }
  }

  /** Writes bytes at any offset into the head; partial blocks the head does not hold are copied up first. */
  write(offset: number, data: Uint8Array): void {
    const head = this.top;
    const B = this.blockSize;
    const end = offset + data.length;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / B);
      const blockStart = block * B;
      if (pos === blockStart && end - pos >= B) {
        // Whole blocks: one pwrite for the aligned middle of the request.
        const blocks = Math.floor((end - pos) / B);
        const bytes = blocks * B;
        head.writeAt(data.subarray(pos - offset, pos - offset + bytes), pos);
        this.held(block, block + blocks);
        pos += bytes;
        continue;
      }
      const pieceEnd = Math.min(end, blockStart + B);
      const piece = data.subarray(pos - offset, pieceEnd - offset);
      const owner = this.index.ownerOf(block);
      if (owner === head) {
        head.writeAt(piece, pos);
      } else {
        // Copy-on-write of a partial block: the rest of it comes from whoever answers for it now.
        const full = Buffer.alloc(B);
        owner?.readInto(full, 0, B, blockStart);
        full.set(piece, pos - blockStart);
        head.writeAt(full, blockStart);
      }
      this.held(block, block + 1);
      pos = pieceEnd;
    }
  }

  /** Trims a range: whole blocks become zeros recorded as trims, partial edges are overwritten with zeros. */
  trim(offset: number, length: number): void {
    const B = this.blockSize;
    const end = offset + length;
    for (const [first, last, toHead] of trimmedBlocks(offset, length, B)) {
      if (toHead) {
        const from = Math.max(offset, first * B);
        this.write(from, new Uint8Array(Math.min(end, last * B) - from));
      } else {
        this.top.markTrimmed(first, last);
        this.index.assign(first, last, null);
      }
    }
  }

  /** The head now holds blocks [first, end) as data: its bits and the index say so together. */
  private held(first: number, end: number): void {
    this.top.markWritten(first, end);
    this.index.assign(first, end, this.top);
  }
}

/**
 * What a trim of [offset, offset + length) does to each block: whole blocks become zeros (`toHead` false),
 * partial edges are written with zeros into the head (`toHead` true).
 */
export function trimmedBlocks(offset: number, length: number, blockSize: number): ChangedBlocks[] {
  const end = offset + length;
  const firstWhole = Math.ceil(offset / blockSize);
  const endWhole = Math.floor(end / blockSize);
  const first = Math.floor(offset / blockSize);
  const last = Math.ceil(end / blockSize);
  if (firstWhole >= endWhole) return [[first, last, true]];
  const out: ChangedBlocks[] = [];
  if (first < firstWhole) out.push([first, firstWhole, true]);
  out.push([firstWhole, endWhole, false]);
  if (endWhole < last) out.push([endWhole, last, true]);
  return out;
}

/**
 * A plain in-memory model of the block store, independent of the engine's layer code, used as the
 * oracle of the model-based property test. Content is a byte array per volume and snapshot; change
 * tracking is a tree of lineage nodes: every snapshot (and every clone of a live volume) closes the
 * node the volume was writing into and starts a fresh one above it, so "what changed between A and B"
 * is the union of the nodes met walking from B down to A.
 */
import type { Extent, ExtentStyle, VolumeInfo } from '../../../storage-engine/types.js';
import { mulberry32 } from '../../support/random.js';

/** What the last operation did to a block within one node: a write (partial trims count as writes) or a whole-block trim. */
export type Touch = 'write' | 'trim';

/** One interval of a lineage: the blocks touched while it was the open head of a volume. */
export class LineageNode {
  readonly touched = new Map<number, Touch>();
  constructor(readonly parent: LineageNode | undefined) {}
}

export interface ModelVolume {
  id: string;
  capacityBytes: number;
  content: Uint8Array;
  head: LineageNode;
  source: VolumeInfo['source'];
}

export interface ModelSnapshot {
  id: string;
  sourceVolumeId: string;
  capacityBytes: number;
  content: Uint8Array;
  node: LineageNode;
  /** The group snapshot it was taken in: it is then deleted with its group only. */
  groupId?: string;
}

/** A group snapshot: one point in time of several volumes, deleted as a whole. */
export interface ModelGroup {
  id: string;
  /** In the order of the request. */
  members: ModelSnapshot[];
}

export class BlockModel {
  /** Live volumes in creation order. */
  readonly volumes: ModelVolume[] = [];
  /** Live snapshots in creation order. */
  readonly snapshots: ModelSnapshot[] = [];
  /** Deleted snapshots: their lineage stays, and deltas from them must stay exact (invariant 8). */
  readonly deletedSnapshots: ModelSnapshot[] = [];
  /** Live group snapshots in creation order. */
  readonly groups: ModelGroup[] = [];

  constructor(readonly blockSize: number) {}

  createVolume(id: string, capacityBytes: number): ModelVolume {
    const vol: ModelVolume = {
      id,
      capacityBytes,
      content: new Uint8Array(capacityBytes),
      head: new LineageNode(undefined),
      source: undefined,
    };
    this.volumes.push(vol);
    return vol;
  }

  write(vol: ModelVolume, offset: number, data: Uint8Array): void {
    vol.content.set(data, offset);
    for (const block of this.blocksOfRange(offset, data.length)) vol.head.touched.set(block, 'write');
  }

  /** Whole blocks inside the range become trimmed; partial edge blocks are zero-filled, which is a write. */
  trim(vol: ModelVolume, offset: number, length: number): void {
    vol.content.fill(0, offset, offset + length);
    const bs = this.blockSize;
    for (const block of this.blocksOfRange(offset, length)) {
      const whole = block * bs >= offset && (block + 1) * bs <= offset + length;
      vol.head.touched.set(block, whole ? 'trim' : 'write');
    }
  }

  snapshot(vol: ModelVolume, id: string): ModelSnapshot {
    const frozen = vol.head;
    vol.head = new LineageNode(frozen);
    const snap: ModelSnapshot = {
      id,
      sourceVolumeId: vol.id,
      capacityBytes: vol.capacityBytes,
      content: vol.content.slice(),
      node: frozen,
    };
    this.snapshots.push(snap);
    return snap;
  }

  /** Snapshots each volume at the same point, as members of one group (`ids` in `vols` order). */
  groupSnapshot(vols: readonly ModelVolume[], groupId: string, ids: readonly string[]): ModelGroup {
    const members = vols.map((vol, i) => {
      const snap = this.snapshot(vol, ids[i]!);
      snap.groupId = groupId;
      return snap;
    });
    const group = { id: groupId, members };
    this.groups.push(group);
    return group;
  }

  deleteGroup(group: ModelGroup): void {
    this.groups.splice(this.groups.indexOf(group), 1);
    for (const snap of group.members) this.deleteSnapshot(snap);
  }

  cloneFromSnapshot(snap: ModelSnapshot, id: string, capacityBytes: number): ModelVolume {
    const content = new Uint8Array(capacityBytes);
    content.set(snap.content);
    const vol: ModelVolume = {
      id,
      capacityBytes,
      content,
      head: new LineageNode(snap.node),
      source: { kind: 'snapshot', snapshotId: snap.id },
    };
    this.volumes.push(vol);
    return vol;
  }

  /** The source's open interval is closed and shared: both volumes continue from it with heads of their own. */
  cloneFromVolume(src: ModelVolume, id: string, capacityBytes: number): ModelVolume {
    const frozen = src.head;
    src.head = new LineageNode(frozen);
    const content = new Uint8Array(capacityBytes);
    content.set(src.content);
    const vol: ModelVolume = {
      id,
      capacityBytes,
      content,
      head: new LineageNode(frozen),
      source: { kind: 'volume', volumeId: src.id },
    };
    this.volumes.push(vol);
    return vol;
  }

  grow(vol: ModelVolume, capacityBytes: number): void {
    const content = new Uint8Array(capacityBytes);
    content.set(vol.content);
    vol.content = content;
    vol.capacityBytes = capacityBytes;
  }

  deleteVolume(vol: ModelVolume): void {
    this.volumes.splice(this.volumes.indexOf(vol), 1);
  }

  deleteSnapshot(snap: ModelSnapshot): void {
    this.snapshots.splice(this.snapshots.indexOf(snap), 1);
    this.deletedSnapshots.push(snap);
  }

  /**
   * Blocks written or trimmed after base up to and including target along target's lineage, or
   * undefined when base is not in target's lineage (wrong order or unrelated).
   */
  delta(base: ModelSnapshot, target: ModelSnapshot): Set<number> | undefined {
    const blocks = new Set<number>();
    if (base === target) return blocks;
    let node: LineageNode | undefined = target.node;
    while (node !== undefined && node !== base.node) {
      for (const block of node.touched.keys()) blocks.add(block);
      node = node.parent;
    }
    return node === undefined ? undefined : blocks;
  }

  /** Blocks whose last touching operation in the snapshot's lineage was a write. */
  allocated(snap: ModelSnapshot): Set<number> {
    const decided = new Set<number>();
    const allocated = new Set<number>();
    for (let node: LineageNode | undefined = snap.node; node !== undefined; node = node.parent) {
      for (const [block, touch] of node.touched) {
        if (decided.has(block)) continue;
        decided.add(block);
        if (touch === 'write') allocated.add(block);
      }
    }
    return allocated;
  }

  /** Blocks whose bytes differ between two contents, the shorter one read as zero-extended. */
  differingBlocks(a: Uint8Array, b: Uint8Array): Set<number> {
    const bs = this.blockSize;
    const blocks = new Set<number>();
    const total = Math.max(a.length, b.length);
    for (let block = 0; block * bs < total; block++) {
      for (let i = block * bs; i < (block + 1) * bs; i++) {
        if ((a[i] ?? 0) !== (b[i] ?? 0)) {
          blocks.add(block);
          break;
        }
      }
    }
    return blocks;
  }

  blocksOfRange(offset: number, length: number): number[] {
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    const blocks: number[] = [];
    for (let b = first; b <= last; b++) blocks.push(b);
    return blocks;
  }
}

/** The extents a correct engine reports for a block set, from the block containing startingOffset on. */
export function expectedExtents(
  blocks: Iterable<number>,
  blockSize: number,
  style: ExtentStyle,
  startingOffset = 0,
): Extent[] {
  const startBlock = Math.floor(startingOffset / blockSize);
  const sorted = [...blocks].filter((b) => b >= startBlock).sort((x, y) => x - y);
  const extents: Extent[] = [];
  for (const block of sorted) {
    const last = extents[extents.length - 1];
    if (style === 'VARIABLE' && last !== undefined && last.offset + last.length === block * blockSize) {
      last.length += blockSize;
    } else {
      extents.push({ offset: block * blockSize, length: blockSize });
    }
  }
  return extents;
}

/** Returns a description of the first way the extents break the shape rules, or undefined if they keep them. */
export function extentShapeViolation(
  extents: readonly Extent[],
  blockSize: number,
  style: ExtentStyle,
  capacityBytes: number,
  startingOffset: number,
): string | undefined {
  let previousEnd = -1;
  for (const [i, e] of extents.entries()) {
    const where = `extent #${i} ${JSON.stringify(e)}`;
    if (!Number.isInteger(e.offset) || !Number.isInteger(e.length)) return `${where}: not integers`;
    if (e.offset % blockSize !== 0 || e.length % blockSize !== 0 || e.length <= 0) return `${where}: not block aligned`;
    if (style === 'FIXED' && e.length !== blockSize) return `${where}: FIXED extent is not one block`;
    if (e.offset + e.length > capacityBytes) return `${where}: past capacity ${capacityBytes}`;
    if (e.offset < previousEnd) return `${where}: not ascending / overlaps the previous one`;
    if (style === 'VARIABLE' && e.offset === previousEnd)
      return `${where}: VARIABLE run not maximal (touches the previous one)`;
    if (i === 0 && e.offset + e.length <= startingOffset)
      return `${where}: first extent ends at or before startingOffset ${startingOffset}`;
    previousEnd = e.offset + e.length;
  }
  return undefined;
}

/** Deterministic bytes so a failing seed replays the same data. */
export function patternBytes(seed: number, length: number): Uint8Array {
  const next = mulberry32(seed);
  const data = new Uint8Array(length);
  // Never zero, so a write is always distinguishable from a trim or an unwritten block.
  for (let i = 0; i < length; i++) data[i] = 1 + Math.floor(next() * 255);
  return data;
}

export { mulberry32 };

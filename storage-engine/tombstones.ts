/**
 * Change records of deleted snapshots (invariant 8). Deleting a snapshot drops its record, and compaction
 * later merges its layer into the one above; a backup tool that kept only the snapshot's ID must still be
 * able to ask "what changed since then". A tombstone keeps exactly that, as bits and no data:
 *
 *   anchor    a layer still in the store; layers above it answer for changes after it as usual
 *   changed   blocks changed after the deleted snapshot that no longer show in the anchor's or later bits
 *   excluded  null: none of the anchor's own bits count (it is the deleted snapshot's layer, or older);
 *             else the anchor's bits count except these (blocks a merge brought in from below)
 *
 * so delta(deleted, target) = changed ∪ (anchor's bits − excluded) ∪ (bits of the layers above the anchor up
 * to the target). A tombstone starts at the deleted snapshot's own layer (excluded null, nothing changed).
 * When compaction merges the anchor into the layer above, the counted part of the anchor moves into
 * `changed`, the anchor moves up, and the blocks the merge brings in are excluded. When it merges a layer
 * below into an anchor whose own bits count, the blocks brought in are excluded too: they are older. If the new anchor is a
 * live head, a later write to an excluded block is a change: the store removes it from `excluded` as it is
 * written, and persists that with the head's next commit. When the anchor is dropped (nothing is above it),
 * no later snapshot can name it, and the tombstone goes. Past retention (age, or count per volume) its bits
 * are dropped and the answer is "take a full backup".
 */
import { Bitmap } from './bitmap.js';

export interface Tombstone {
  snapshotId: string;
  sourceVolumeId: string;
  anchorLayerId: number;
  /** Changes not visible in the anchor's counted bits or above; null once expired. */
  changed: Bitmap | null;
  /** Which of the anchor's own bits do not count: null for all of them (see the file comment). */
  excluded: Bitmap | null;
  capacityBytes: number;
  blockSize: number;
  deletedAtMs: number;
}

/** How long deleted snapshots stay usable as a delta base. */
export interface TombstoneRetention {
  /** Milliseconds after deletion. */
  maxAgeMs: number;
  /** Most usable tombstones per source volume (the oldest expire first). */
  maxPerVolume: number;
}

export const DEFAULT_TOMBSTONE_RETENTION: TombstoneRetention = {
  maxAgeMs: 30 * 24 * 3600 * 1000,
  maxPerVolume: 256,
};

const NONE: Tombstone[] = [];

export class Tombstones {
  private readonly byId = new Map<string, Tombstone>();
  /** The same tombstones by anchor layer; an anchor changes only through applyMove. */
  private readonly byAnchor = new Map<number, Set<Tombstone>>();

  constructor(readonly retention: TombstoneRetention) {}

  get size(): number {
    return this.byId.size;
  }

  add(t: Tombstone): void {
    this.byId.set(t.snapshotId, t);
    this.anchor(t);
  }

  get(snapshotId: string): Tombstone | undefined {
    return this.byId.get(snapshotId);
  }

  remove(snapshotId: string): void {
    const t = this.byId.get(snapshotId);
    if (!t) return;
    this.byId.delete(snapshotId);
    this.unanchor(t);
  }

  /** Whether a tombstone can still answer a delta at `nowMs`. */
  usable(t: Tombstone, nowMs: number): boolean {
    return t.changed !== null && nowMs - t.deletedAtMs <= this.retention.maxAgeMs;
  }

  /** Tombstones anchored at a layer (asked on every flush of a head: a lookup, not a scan). */
  anchoredAt(layerId: number): Tombstone[] {
    const set = this.byAnchor.get(layerId);
    return set ? [...set] : [];
  }

  /** Usable tombstones of one volume past its count limit, oldest first: these expire now. */
  overCount(sourceVolumeId: string): Tombstone[] {
    const usable = [...this.byId.values()].filter((t) => t.sourceVolumeId === sourceVolumeId && t.changed !== null);
    usable.sort((a, b) => a.deletedAtMs - b.deletedAtMs);
    return usable.slice(0, Math.max(0, usable.length - this.retention.maxPerVolume));
  }

  /**
   * The anchors' moves for a merge of layer `lower` (its bits `lowerBits`) into the layer above, which gains
   * the blocks `broughtIn`: the counted part of `lower` joins `changed`, and the brought-in blocks are
   * excluded at the new anchor. Apply them with `applyMove` once the transaction committed.
   */
  planMerge(
    lower: number,
    lowerBits: Bitmap,
    broughtIn: Bitmap,
  ): Array<{ tombstone: Tombstone; changed: Bitmap | null; excluded: Bitmap | null }> {
    return this.anchoredAt(lower).map((t) => {
      if (t.changed === null) return { tombstone: t, changed: null, excluded: null };
      const counted = t.excluded === null ? undefined : Bitmap.andNot(lowerBits, t.excluded);
      return {
        tombstone: t,
        changed: counted ? Bitmap.or(t.changed, counted) : t.changed,
        excluded: broughtIn.clone(),
      };
    });
  }

  /**
   * The same merge seen from the upper layer: records already anchored there gain the brought-in blocks as
   * excluded, since everything below an anchor is older than its deleted snapshot. Apply with `applyMove`.
   */
  planAbsorb(
    upper: number,
    broughtIn: Bitmap,
  ): Array<{ tombstone: Tombstone; changed: Bitmap | null; excluded: Bitmap | null }> {
    return this.anchoredAt(upper)
      .filter((t) => t.changed !== null && t.excluded !== null)
      .map((t) => ({ tombstone: t, changed: t.changed, excluded: Bitmap.or(t.excluded!, broughtIn) }));
  }

  applyMove(t: Tombstone, anchorLayerId: number, changed: Bitmap | null, excluded: Bitmap | null): void {
    this.unanchor(t);
    t.anchorLayerId = anchorLayerId;
    this.anchor(t);
    t.changed = changed;
    t.excluded = changed === null ? null : excluded;
  }

  /**
   * Tombstones anchored at a layer that exclude some of blocks [first, end): rewriting those blocks in place
   * changes them. A lookup, then a range count per record: asked before every write.
   */
  excludingAny(layerId: number, first: number, end: number): Tombstone[] {
    const set = this.byAnchor.get(layerId);
    if (!set) return NONE;
    return [...set].filter((t) => t.excluded !== null && t.excluded.rangeCardinality(first, end) > 0);
  }

  /** Blocks [first, end) of a live anchor were written or trimmed: they now count as changed. */
  touched(layerId: number, first: number, end: number): void {
    for (const t of this.byAnchor.get(layerId) ?? []) t.excluded?.removeRange(first, end);
  }

  private anchor(t: Tombstone): void {
    let set = this.byAnchor.get(t.anchorLayerId);
    if (!set) {
      set = new Set();
      this.byAnchor.set(t.anchorLayerId, set);
    }
    set.add(t);
  }

  private unanchor(t: Tombstone): void {
    const set = this.byAnchor.get(t.anchorLayerId);
    set?.delete(t);
    if (set?.size === 0) this.byAnchor.delete(t.anchorLayerId);
  }
}

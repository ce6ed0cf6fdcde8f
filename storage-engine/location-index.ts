/**
 * The location index: for one chain, which layer holds each block's data. Without it a read asks every
 * layer's bitmaps top-down, so its cost grows with the number of snapshots; with it a read is a binary search.
 *
 * It is a sorted map of disjoint block runs [start, end) to their owner; blocks in no run read as zeros
 * (never written, or trimmed by the topmost layer that answers for them). Space follows the number of runs,
 * not the capacity: a 1 TiB volume written end to end by one layer is one run. Runs are kept in chunks of
 * bounded length, so an update moves at most a chunk's worth of entries.
 *
 * The index is derived state: it is rebuilt from the layers' bitmaps at open (see `indexChain`), so it needs
 * no persistence and cannot disagree with the catalog after a crash.
 */

/** Most runs in one chunk before it is split in two. */
const MAX_RUNS = 512;

interface Chunk<T> {
  starts: number[];
  /** Exclusive ends; ends[i] <= starts[i + 1]. */
  ends: number[];
  owners: T[];
}

/** The answer of `lookup`: who holds a block, and where that answer stops holding. */
export interface Stretch<T> {
  /** The owning layer, or null for zeros. */
  owner: T | null;
  /** First block after `block` whose answer may differ (Infinity past the last run). */
  end: number;
}

export class LocationIndex<T extends object> {
  private chunks: Chunk<T>[] = [];
  /** Runs per owner, so that `relabel` and `holds` skip indexes an owner is not in. */
  private readonly runsOf = new Map<T, number>();
  /** Reused by `lookup` so the read path allocates nothing per block. */
  private readonly stretch: Stretch<T> = { owner: null, end: 0 };

  /** Number of runs (for tests and memory accounting). */
  get size(): number {
    let n = 0;
    for (const c of this.chunks) n += c.starts.length;
    return n;
  }

  /** Whether any block is owned by `owner`. */
  holds(owner: T): boolean {
    return (this.runsOf.get(owner) ?? 0) > 0;
  }

  /** Who holds `block` and how far that goes. The returned object is reused by the next call. */
  lookup(block: number): Readonly<Stretch<T>> {
    const out = this.stretch;
    const ci = this.chunkFor(block);
    const chunk = this.chunks[ci];
    if (!chunk) {
      out.owner = null;
      out.end = Infinity;
      return out;
    }
    const i = lastAtOrBefore(chunk.starts, block);
    if (i >= 0 && chunk.ends[i]! > block) {
      out.owner = chunk.owners[i]!;
      out.end = chunk.ends[i]!;
      return out;
    }
    out.owner = null;
    // A gap runs to the next run's start, which may be in the next chunk.
    const next = i + 1 < chunk.starts.length ? chunk.starts[i + 1]! : (this.chunks[ci + 1]?.starts[0] ?? Infinity);
    out.end = next;
    return out;
  }

  /** The owner of `block`, or null for zeros. */
  ownerOf(block: number): T | null {
    return this.lookup(block).owner;
  }

  /** Records that blocks [first, end) are now held by `owner` (null: they read as zeros). */
  assign(first: number, end: number, owner: T | null): void {
    if (!(first < end)) return;
    let emptied = false;
    for (let c = this.chunkFor(first); c < this.chunks.length; c++) {
      const chunk = this.chunks[c]!;
      if (chunk.starts[0]! >= end) break;
      this.cut(chunk, first, end);
      if (chunk.starts.length === 0) emptied = true;
    }
    if (emptied) this.chunks = this.chunks.filter((c) => c.starts.length > 0);
    if (owner !== null) this.insert(first, end, owner);
  }

  /** Hands every block of `from` to `to` (a merge moved `from`'s data into `to`). */
  relabel(from: T, to: T): void {
    if (!this.holds(from)) return;
    for (const chunk of this.chunks) {
      const { starts, ends, owners } = chunk;
      let w = 0;
      for (let r = 0; r < starts.length; r++) {
        const owner = owners[r] === from ? to : owners[r]!;
        if (w > 0 && owners[w - 1] === owner && ends[w - 1] === starts[r]) {
          ends[w - 1] = ends[r]!;
          this.count(owner, -1);
          continue;
        }
        starts[w] = starts[r]!;
        ends[w] = ends[r]!;
        owners[w] = owner;
        w++;
      }
      starts.length = ends.length = owners.length = w;
    }
    this.count(to, this.runsOf.get(from) ?? 0);
    this.runsOf.delete(from);
  }

  /** An independent copy (a clone of a volume starts with its source's answers). */
  clone(): LocationIndex<T> {
    const copy = new LocationIndex<T>();
    copy.chunks = this.chunks.map((c) => ({
      starts: c.starts.slice(),
      ends: c.ends.slice(),
      owners: c.owners.slice(),
    }));
    for (const [owner, n] of this.runsOf) copy.runsOf.set(owner, n);
    return copy;
  }

  /** Every run in block order (for tests and rebuild checks). */
  *runs(): Generator<{ start: number; end: number; owner: T }> {
    for (const c of this.chunks) {
      for (let i = 0; i < c.starts.length; i++) yield { start: c.starts[i]!, end: c.ends[i]!, owner: c.owners[i]! };
    }
  }

  /** Builds an index from runs sorted by start and disjoint (adjacent runs of one owner may be separate). */
  static fromSortedRuns<T extends object>(runs: Iterable<{ start: number; end: number; owner: T }>): LocationIndex<T> {
    const index = new LocationIndex<T>();
    let chunk: Chunk<T> | undefined;
    for (const { start, end, owner } of runs) {
      if (chunk && chunk.starts.length > 0) {
        const last = chunk.starts.length - 1;
        if (chunk.ends[last] === start && chunk.owners[last] === owner) {
          chunk.ends[last] = end;
          continue;
        }
      }
      if (!chunk || chunk.starts.length >= MAX_RUNS / 2) {
        chunk = { starts: [], ends: [], owners: [] };
        index.chunks.push(chunk);
      }
      chunk.starts.push(start);
      chunk.ends.push(end);
      chunk.owners.push(owner);
      index.count(owner, 1);
    }
    return index;
  }

  // ---------------------------------------------------------------- internals

  /** The chunk that holds or would hold `block`: the last one starting at or before it, else the first. */
  private chunkFor(block: number): number {
    let lo = 0;
    let hi = this.chunks.length - 1;
    let found = 0;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.chunks[mid]!.starts[0]! <= block) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return found;
  }

  /** Removes [first, end) from one chunk's runs, keeping the parts of cut runs outside it. */
  private cut(chunk: Chunk<T>, first: number, end: number): void {
    const { starts, ends, owners } = chunk;
    // Runs i..j-1 overlap [first, end): ends[i] > first and starts[j - 1] < end.
    const i = firstAbove(ends, first);
    let j = firstAtOrAbove(starts, end);
    if (i >= j) return;
    const leftOwner = owners[i]!;
    const rightOwner = owners[j - 1]!;
    const keepLeft = starts[i]! < first;
    const keepRight = ends[j - 1]! > end;
    const rightEnd = ends[j - 1]!;
    // Usual case, one block rewritten inside or over one run: adjust in place, no splice.
    if (j - i === 1 && keepLeft !== keepRight) {
      if (keepLeft) ends[i] = first;
      else starts[i] = end;
      return;
    }
    for (let k = i; k < j; k++) this.count(owners[k]!, -1);
    let at = i;
    if (keepLeft) {
      ends[at] = first;
      this.count(leftOwner, 1);
      at++;
    }
    if (keepRight) {
      starts.splice(at, 0, end);
      ends.splice(at, 0, rightEnd);
      owners.splice(at, 0, rightOwner);
      this.count(rightOwner, 1);
      at++;
      j++;
    }
    starts.splice(at, j - at);
    ends.splice(at, j - at);
    owners.splice(at, j - at);
  }

  /** Inserts a run over a range no run covers, joining a neighbour of the same owner that touches it. */
  private insert(first: number, end: number, owner: T): void {
    if (this.chunks.length === 0) this.chunks.push({ starts: [], ends: [], owners: [] });
    const ci = this.chunkFor(first);
    const chunk = this.chunks[ci]!;
    const { starts, ends, owners } = chunk;
    const pos = firstAbove(starts, first);
    const joinsPrev = pos > 0 && ends[pos - 1] === first && owners[pos - 1] === owner;
    const joinsNext = pos < starts.length && starts[pos] === end && owners[pos] === owner;
    if (joinsPrev && joinsNext) {
      ends[pos - 1] = ends[pos]!;
      starts.splice(pos, 1);
      ends.splice(pos, 1);
      owners.splice(pos, 1);
      this.count(owner, -1);
      return;
    }
    if (joinsPrev) {
      ends[pos - 1] = end;
      return;
    }
    if (joinsNext) {
      starts[pos] = first;
      return;
    }
    starts.splice(pos, 0, first);
    ends.splice(pos, 0, end);
    owners.splice(pos, 0, owner);
    this.count(owner, 1);
    if (starts.length > MAX_RUNS) {
      const half = starts.length >> 1;
      const right: Chunk<T> = { starts: starts.splice(half), ends: ends.splice(half), owners: owners.splice(half) };
      this.chunks.splice(ci + 1, 0, right);
    }
  }

  private count(owner: T, delta: number): void {
    const n = (this.runsOf.get(owner) ?? 0) + delta;
    if (n === 0) this.runsOf.delete(owner);
    else this.runsOf.set(owner, n);
  }
}

/** Index of the last value <= x in a sorted array, or -1. */
function lastAtOrBefore(sorted: readonly number[], x: number): number {
  return firstAbove(sorted, x) - 1;
}

/** Index of the first value > x in a sorted array (length if none). */
function firstAbove(sorted: readonly number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid]! <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Index of the first value >= x in a sorted array (length if none). */
function firstAtOrAbove(sorted: readonly number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

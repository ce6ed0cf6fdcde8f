/** What the client hands a backup tool: extents of a snapshot, and how the driver described them. */

/** A byte range of the volume: allocated (allocated()) or changed (delta()). */
export interface Extent {
  /** Byte offset from the start of the volume. */
  offset: number;
  /** Length in bytes, > 0. */
  length: number;
}

/** How the driver lists extents: one block a tuple (FIXED) or merged runs (VARIABLE). */
export type BlockMetadataType = 'FIXED_LENGTH' | 'VARIABLE_LENGTH';

/** Options of allocated() and delta(). */
export interface ListOptions {
  /** Byte offset to start from (the first extent returned ends after it). Default 0. */
  startingOffset?: number;
  /** Tuples per message the driver should send at most (0: the driver decides). */
  maxResults?: number;
  /** Stops the listing: iteration then rejects with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Re-chunk the driver's answer into blocks of this many bytes (a power of two): every extent returned
   * is then one whole, aligned block (the last may end early at the capacity), covering every byte the
   * driver named.
   */
  blockSize?: number;
}

/**
 * A listing: known capacity and style, and the extents in strictly increasing, non-overlapping order.
 * Iterate it once, either one extent at a time or, cheaper for millions of extents, with batches().
 */
export interface ExtentListing extends AsyncIterable<Extent> {
  /** The snapshot's size in bytes (the target's, for a delta). */
  readonly capacityBytes: number;
  readonly blockMetadataType: BlockMetadataType;
  /** How many times the listing resumed after a cut stream, so far. */
  readonly resumes: number;
  /**
   * The same extents in non-empty arrays, about one driver response each (thousands of extents): one
   * promise a batch instead of one an extent. The arrays are the caller's to keep.
   */
  batches(): AsyncIterable<Extent[]>;
}

/** One response of the driver, decoded: what every transport yields. */
export interface MetadataPage {
  blockMetadataType: BlockMetadataType;
  capacityBytes: number;
  /** Byte offsets and lengths: tuple i at [2i, 2i + 1]. */
  tuples: ArrayLike<number>;
}

/** A snapshot metadata request, in the form both transports understand. */
export type MetadataRequest =
  | { kind: 'allocated'; snapshot: string; startingOffset: number; maxResults: number }
  | { kind: 'delta'; base: string; target: string; startingOffset: number; maxResults: number };

/**
 * The seam between the client's logic (resume, ordering, re-chunking, typed errors) and the way it reaches
 * the driver: the driver's own socket (csi-direct-transport.ts) or the csi-snapshot-metadata sidecar in a
 * cluster (a Kubernetes transport, same interface). A transport opens one stream and reports failures as
 * ConnectError with the gRPC code; it neither retries nor re-orders.
 */
export interface MetadataTransport {
  open(request: MetadataRequest, signal: AbortSignal): AsyncIterable<MetadataPage>;
  /** Releases connections. */
  close(): Promise<void> | void;
}

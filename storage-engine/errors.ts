/**
 * Typed engine errors. Each carries a `code` that adapters (src/) map to their own status codes in one
 * place; the engine never knows about gRPC.
 */

/** The reasons an engine operation can be refused. */
export type EngineErrorCode =
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'INVALID_ARGUMENT'
  | 'OUT_OF_RANGE'
  | 'NO_SPACE'
  | 'BUSY'
  | 'UNRELATED'
  | 'HISTORY_GONE'
  | 'CLOSED';

/** Base class of every error the engine throws on purpose. */
export class EngineError extends Error {
  constructor(
    readonly code: EngineErrorCode,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** An ID, or a name looked up, does not exist. */
export class NotFoundError extends EngineError {
  constructor(message: string) {
    super('NOT_FOUND', message);
  }
}

/** A name is already taken by an object with different properties. */
export class AlreadyExistsError extends EngineError {
  constructor(message: string) {
    super('ALREADY_EXISTS', message);
  }
}

/** An argument is malformed: wrong type, negative, unaligned, not a power of two, unknown option. */
export class InvalidArgumentError extends EngineError {
  constructor(message: string) {
    super('INVALID_ARGUMENT', message);
  }
}

/** An offset or length falls outside the object's capacity, or a size is beyond what the engine can address. */
export class OutOfRangeError extends EngineError {
  constructor(message: string) {
    super('OUT_OF_RANGE', message);
  }
}

/** The store's capacity limit or the underlying disk is exhausted. */
export class NoSpaceError extends EngineError {
  constructor(message: string) {
    super('NO_SPACE', message);
  }
}

/** The object is in use (e.g. a volume held open by the data plane) and cannot be changed that way now. */
export class BusyError extends EngineError {
  constructor(message: string) {
    super('BUSY', message);
  }
}

/** Two snapshots share no chain, or are in the wrong order, so no delta between them is defined. */
export class UnrelatedSnapshotsError extends EngineError {
  constructor(message: string) {
    super('UNRELATED', message);
  }
}

/** The base of a delta was deleted and its change record has expired: only a full backup can follow. */
export class HistoryGoneError extends EngineError {
  constructor(message: string) {
    super('HISTORY_GONE', message);
  }
}

/** The store was closed; no further operations are accepted. */
export class StoreClosedError extends EngineError {
  constructor() {
    super('CLOSED', 'the block store is closed');
  }
}

/**
 * Whether an error says the disk under the store is full: ENOSPC or EDQUOT from file I/O, SQLite's
 * SQLITE_FULL ("database or disk is full", which is how it reports ENOSPC on a write), or our NoSpaceError.
 */
export function isNoSpace(err: unknown): boolean {
  if (err instanceof NoSpaceError) return true;
  const code = (err as { code?: unknown } | null | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT' || code === 'SQLITE_FULL';
}

/**
 * The one place where a full disk becomes NoSpaceError, from file I/O and from the catalog alike; any
 * other error is rethrown unchanged.
 */
export function translateIoError(err: unknown, what: string): never {
  if (err instanceof EngineError) throw err;
  if (isNoSpace(err)) throw new NoSpaceError(`${what}: the disk under the store is full`);
  throw err;
}

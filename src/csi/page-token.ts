/**
 * Paging for ListVolumes and ListSnapshots. Entries are ordered by (creation time, ID), and a token names
 * the last entry a page returned, so the next page resumes strictly after that key: it still works when
 * that entry has been deleted meanwhile, and entries created later land on later pages.
 */
import { Code } from '@connectrpc/connect';
import { rpcError } from '../rpc/status.js';

/** What paging needs of a listed object. */
export interface Pageable {
  readonly id: string;
  readonly createdAtMs: number;
}

/** One page and the token for the next ('' when this page is the last). */
export interface Page<T> {
  entries: T[];
  nextToken: string;
}

const TOKEN = /^(\d{1,16})\.([a-z0-9-]{1,64})$/;

/** The token that resumes after `entry`: `<createdAtMs>.<id>`. Opaque to the CO. */
export function tokenAfter(entry: Pageable): string {
  return `${entry.createdAtMs}.${entry.id}`;
}

/**
 * Sorts `items` by (creation time, ID) and returns the page that `startingToken` and `maxEntries` select.
 * A negative max_entries is INVALID_ARGUMENT; a token we did not issue (wrong shape, or an ID of the
 * wrong kind per `isId`) is ABORTED, as the ListVolumes/ListSnapshots error tables say.
 */
export function paginate<T extends Pageable>(
  items: readonly T[],
  request: { maxEntries: number; startingToken: string },
  isId: (id: string) => boolean,
): Page<T> {
  if (request.maxEntries < 0) {
    throw rpcError(Code.InvalidArgument, `max_entries must not be negative, got ${request.maxEntries}`);
  }
  const after = request.startingToken === '' ? undefined : parseToken(request.startingToken, isId);
  const sorted = [...items].sort(compareKeys);
  const start = after === undefined ? 0 : firstAfter(sorted, after);
  const rest = sorted.slice(start);
  if (request.maxEntries === 0 || rest.length <= request.maxEntries) return { entries: rest, nextToken: '' };
  const entries = rest.slice(0, request.maxEntries);
  return { entries, nextToken: tokenAfter(entries[entries.length - 1]!) };
}

function parseToken(token: string, isId: (id: string) => boolean): Pageable {
  const m = TOKEN.exec(token);
  const createdAtMs = m ? Number(m[1]) : NaN;
  if (!m || !Number.isSafeInteger(createdAtMs) || !isId(m[2]!)) {
    throw rpcError(Code.Aborted, 'starting_token is not a token this plugin issued; start listing again without one');
  }
  return { createdAtMs, id: m[2]! };
}

function compareKeys(a: Pageable, b: Pageable): number {
  if (a.createdAtMs !== b.createdAtMs) return a.createdAtMs - b.createdAtMs;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/** Index of the first entry whose key is greater than `key` (binary search over the sorted list). */
function firstAfter(sorted: readonly Pageable[], key: Pageable): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (compareKeys(sorted[mid]!, key) <= 0) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

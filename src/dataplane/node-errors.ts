/** Why a node request cannot be done, in terms the Node service turns into CSI status codes. */
export type NodeErrorKind =
  | 'invalid-argument'
  | 'not-found'
  | 'already-exists'
  | 'failed-precondition'
  | 'out-of-range'
  /** The state filesystem has no room for what the request must record (ENOSPC, EDQUOT). */
  | 'resource-exhausted';

export class NodeError extends Error {
  constructor(
    readonly kind: NodeErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'NodeError';
  }
}

/** Whether a file-system error means "no space left" (or the quota's version of it). */
export function isNoSpace(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

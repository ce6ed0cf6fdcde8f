/** What peers add to gRPC between them: names shared by the peer listener and the peer client. */

/** Header and trailer in which a peer names the node that answered. */
export const NODE_HEADER = 'cbt-csi-node';

/** Trailer with a peer's status message as UTF-8 bytes (peer-server.ts says why). */
export const EXACT_MESSAGE_TRAILER = 'cbt-csi-message-bin';

/**
 * Mutual TLS between drivers. Every node presents the same certificate (a DaemonSet has one pod template)
 * both as server and as client, and accepts only peers whose certificate chains to the peer CA. Pod IPs
 * are not in the certificate: peers check the name PEER_TLS_NAME instead, which the certificate must carry
 * as a DNS name (the chart's does).
 */
import fs from 'node:fs';
import type http2 from 'node:http2';

/** The DNS name peers expect in each other's certificate. */
export const PEER_TLS_NAME = 'cbt-csi-peer';

/** Where the peer certificate, its key and the peer CA are (PEM files). */
export interface PeerTlsFiles {
  cert: string;
  key: string;
  ca: string;
}

/** The PEM contents, read once at start (a new certificate takes a restart). */
export interface PeerTls {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}

export function loadPeerTls(files: PeerTlsFiles): PeerTls {
  const read = (what: string, file: string): Buffer => {
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw new Error(`cannot read the peer ${what} ${file}: ${(err as Error).message}`);
    }
  };
  return { cert: read('certificate', files.cert), key: read('key', files.key), ca: read('CA', files.ca) };
}

/** Server side: TLS only, and a client certificate from the peer CA required before any request is read. */
export function peerServerOptions(tls: PeerTls): http2.SecureServerOptions {
  return {
    cert: tls.cert,
    key: tls.key,
    ca: tls.ca,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.2',
    allowHTTP1: false,
  };
}

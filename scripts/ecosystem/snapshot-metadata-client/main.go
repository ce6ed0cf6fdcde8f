// Command snapshot-metadata-client asks the csi-snapshot-metadata sidecar for the allocated or changed
// blocks of Kubernetes VolumeSnapshots, the way a backup application in a cluster does, and can check
// the answer against the data. It is the test peer of this project's ecosystem CI: the upstream
// snapshot-metadata-lister and -verifier are modules of their own that the Go module proxy does not
// serve, so this program stands in for both, on the same upstream library they use
// (github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator). The iterator finds the
// SnapshotMetadataService for the snapshot's driver, requests an audience-bound token for the caller's
// ServiceAccount (TokenRequest), dials the service's address trusting its CA, and streams the answer.
//
//	snapshot-metadata-client list   -n NS -s SNAP [-p PREV | -P PREV_ID] [flags]
//	snapshot-metadata-client verify -n NS -s SNAP [-p PREV | -P PREV_ID] --source DEV --target FILE [--base FILE] [flags]
//
// list prints one JSON object a line for each message of the stream, then a summary line. verify copies
// the listed blocks from --source (a device or image of SNAP) onto --target (first made a copy of --base,
// the image of the previous snapshot, when given; zeros otherwise), then compares the whole of --target
// with --source: equal means the metadata named every block that differs. Failures go to stderr as one
// JSON line with the gRPC code when there is one; the exit code is then 1 (2 for bad flags).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"
	"google.golang.org/grpc/status"
	"k8s.io/client-go/tools/clientcmd"
)

const usage = `usage:
  snapshot-metadata-client list   -n NS -s SNAP [-p PREV | -P PREV_ID] [flags]
  snapshot-metadata-client verify -n NS -s SNAP [-p PREV | -P PREV_ID] --source DEV --target FILE [--base FILE] [flags]
`

// copyChunk bounds the memory one copy or comparison step uses.
const copyChunk = 1 << 20

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "list" && os.Args[1] != "verify") {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	os.Exit(run(os.Args[1], os.Args[2:]))
}

type options struct {
	args       iterator.Args
	kubeconfig string
	maxResults int
	source     string
	target     string
	base       string
}

func parse(command string, argv []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet(command, flag.ContinueOnError)
	both := func(p *string, long, short, help string) {
		fs.StringVar(p, long, "", help)
		fs.StringVar(p, short, "", "same as --"+long)
	}
	both(&o.args.Namespace, "namespace", "n", "namespace of the VolumeSnapshots")
	both(&o.args.SnapshotName, "snapshot", "s", "the VolumeSnapshot to list (the newer one, for changed blocks)")
	both(&o.args.PrevSnapshotName, "previous-snapshot", "p", "an older VolumeSnapshot of the same volume: list changed blocks since it")
	both(&o.args.PrevSnapshotID, "previous-snapshot-id", "P", "the CSI handle of the older snapshot instead of its name")
	fs.StringVar(&o.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the caller (default $KUBECONFIG, else in-cluster)")
	fs.StringVar(&o.args.SAName, "service-account", "", "ServiceAccount to request the token for (default: the caller's own)")
	fs.StringVar(&o.args.SANamespace, "service-account-namespace", "", "its namespace")
	fs.StringVar(&o.args.CSIDriver, "csi-driver", "", "the CSI driver (default: read from the snapshot's VolumeSnapshotContent)")
	fs.Int64Var(&o.args.TokenExpirySecs, "token-expiry", 600, "lifetime of the requested token, in seconds")
	fs.Int64Var(&o.args.StartingOffset, "starting-offset", 0, "byte offset to start at")
	fs.IntVar(&o.maxResults, "max-results", 0, "tuples per message at most (0: the driver decides)")
	if command == "verify" {
		fs.StringVar(&o.source, "source", "", "device or image file holding the data of --snapshot")
		fs.StringVar(&o.target, "target", "", "file to rebuild --snapshot in (created or overwritten)")
		fs.StringVar(&o.base, "base", "", "image of the previous snapshot, copied to --target first (default: zeros)")
	}
	if err := fs.Parse(argv); err != nil {
		return nil, err
	}
	o.args.MaxResults = int32(o.maxResults)
	switch {
	case fs.NArg() != 0:
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	case o.args.Namespace == "" || o.args.SnapshotName == "":
		return nil, errors.New("--namespace and --snapshot are required")
	case command == "verify" && (o.source == "" || o.target == ""):
		return nil, errors.New("verify needs --source and --target")
	case o.maxResults < 0 || o.maxResults > 1<<31-1:
		return nil, errors.New("--max-results must be between 0 and 2^31-1")
	}
	return o, nil
}

func run(command string, argv []string) int {
	o, err := parse(command, argv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%v\n%s", err, usage)
		return 2
	}
	// An explicit kubeconfig, else the in-cluster configuration (the usual rules of client-go).
	config, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	if err != nil {
		return fail(fmt.Errorf("kubeconfig: %w", err))
	}
	clients, err := iterator.BuildClients(config)
	if err != nil {
		return fail(err)
	}
	o.args.Clients = clients
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if command == "list" {
		o.args.Emitter = &lineEmitter{out: json.NewEncoder(os.Stdout)}
		if err := iterator.GetSnapshotMetadata(ctx, o.args); err != nil {
			return fail(err)
		}
		return 0
	}

	v, err := openVerifier(o.source, o.target, o.base)
	if err != nil {
		return fail(err)
	}
	defer v.close()
	o.args.Emitter = v
	if err := iterator.GetSnapshotMetadata(ctx, o.args); err != nil {
		return fail(err)
	}
	return 0
}

// fail reports an error as one JSON line on stderr, with the gRPC status code when the sidecar sent one.
func fail(err error) int {
	report := map[string]any{"error": err.Error()}
	if s, ok := status.FromError(err); ok && s != nil {
		report["code"] = s.Code().String()
		report["message"] = s.Message()
	}
	var mismatch *mismatchError
	if errors.As(err, &mismatch) {
		report["verified"] = false
		report["firstDifference"] = mismatch.offset
	}
	_ = json.NewEncoder(os.Stderr).Encode(report)
	return 1
}

// tuple is one byte range, as the proto names its fields.
type tuple struct {
	ByteOffset int64 `json:"byte_offset"`
	SizeBytes  int64 `json:"size_bytes"`
}

type record struct {
	Record              int     `json:"record"`
	BlockMetadataType   string  `json:"block_metadata_type"`
	VolumeCapacityBytes int64   `json:"volume_capacity_bytes"`
	BlockMetadata       []tuple `json:"block_metadata"`
}

// lineEmitter prints each message of the stream as a JSON line (the type by name, not number).
type lineEmitter struct {
	out *json.Encoder
}

func (e *lineEmitter) SnapshotMetadataIteratorRecord(n int, m iterator.IteratorMetadata) error {
	r := record{
		Record:              n,
		BlockMetadataType:   m.BlockMetadataType.String(),
		VolumeCapacityBytes: m.VolumeCapacityBytes,
		BlockMetadata:       make([]tuple, 0, len(m.BlockMetadata)),
	}
	for _, b := range m.BlockMetadata {
		r.BlockMetadata = append(r.BlockMetadata, tuple{ByteOffset: b.ByteOffset, SizeBytes: b.SizeBytes})
	}
	return e.out.Encode(r)
}

func (e *lineEmitter) SnapshotMetadataIteratorDone(n int) error {
	return e.out.Encode(map[string]int{"records": n})
}

// verifier rebuilds the snapshot in the target from the listed blocks of the source, then compares.
type verifier struct {
	source, target *os.File
	capacity       int64
	copied         int64
	buf, other     []byte
}

type mismatchError struct {
	offset int64
}

func (e *mismatchError) Error() string {
	return fmt.Sprintf("the rebuilt target differs from the source at byte %d: the metadata missed a changed block", e.offset)
}

func openVerifier(sourcePath, targetPath, basePath string) (*verifier, error) {
	source, err := os.Open(sourcePath)
	if err != nil {
		return nil, err
	}
	target, err := os.OpenFile(targetPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		source.Close()
		return nil, err
	}
	v := &verifier{source: source, target: target, buf: make([]byte, copyChunk), other: make([]byte, copyChunk)}
	if basePath != "" {
		base, err := os.Open(basePath)
		if err == nil {
			_, err = io.CopyBuffer(target, base, v.buf)
			base.Close()
		}
		if err != nil {
			v.close()
			return nil, fmt.Errorf("copying the base image %s: %w", basePath, err)
		}
	}
	return v, nil
}

func (v *verifier) close() {
	v.source.Close()
	v.target.Close()
}

func (v *verifier) SnapshotMetadataIteratorRecord(_ int, m iterator.IteratorMetadata) error {
	if v.capacity == 0 {
		v.capacity = m.VolumeCapacityBytes
		// Blocks the metadata does not name stay as the base left them, or zero past its end.
		st, err := v.target.Stat()
		if err != nil {
			return err
		}
		if st.Size() < v.capacity {
			if err := v.target.Truncate(v.capacity); err != nil {
				return err
			}
		}
	}
	for _, b := range m.BlockMetadata {
		for done := int64(0); done < b.SizeBytes; {
			n := min(b.SizeBytes-done, copyChunk)
			at := b.ByteOffset + done
			if _, err := v.source.ReadAt(v.buf[:n], at); err != nil {
				return fmt.Errorf("reading %d bytes of the source at %d: %w", n, at, err)
			}
			if _, err := v.target.WriteAt(v.buf[:n], at); err != nil {
				return fmt.Errorf("writing the target at %d: %w", at, err)
			}
			done += n
		}
		v.copied += b.SizeBytes
	}
	return nil
}

func (v *verifier) SnapshotMetadataIteratorDone(records int) error {
	if v.capacity == 0 {
		// No message at all (a driver may send none for an empty answer): the source's size is the volume's.
		size, err := v.source.Seek(0, io.SeekEnd)
		if err != nil {
			return err
		}
		v.capacity = size
		if err := v.target.Truncate(max(size, 0)); err != nil {
			return err
		}
	}
	for at := int64(0); at < v.capacity; {
		n := min(v.capacity-at, copyChunk)
		if _, err := v.source.ReadAt(v.buf[:n], at); err != nil {
			return fmt.Errorf("reading the source at %d: %w", at, err)
		}
		if _, err := v.target.ReadAt(v.other[:n], at); err != nil {
			return fmt.Errorf("reading the target at %d: %w", at, err)
		}
		if !bytes.Equal(v.buf[:n], v.other[:n]) {
			i := int64(0)
			for v.buf[i] == v.other[i] {
				i++
			}
			return &mismatchError{offset: at + i}
		}
		at += n
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"verified":            true,
		"records":             records,
		"bytesCopied":         v.copied,
		"volumeCapacityBytes": v.capacity,
	})
}

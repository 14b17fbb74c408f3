// grpcgo: a real grpc-go peer (cleartext h2c, or TLS on request) for
// h2trace's end-to-end tests.
//
// Built offline from Debian 12 packages (golang-go, golang-google-grpc-dev,
// golang-golang-x-net-dev) in GOPATH mode, no protobuf code generation:
//
//	GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode go build -o grpcgo .
//
// Usage:
//
//	grpcgo server ADDR [--max-age-ms N] [--max-idle-ms N] [--min-ping-interval-ms N] [--delay-ms N]
//	                   [--ignore-deadline]
//	                   [--tls-cert FILE --tls-key FILE]
//	grpcgo client ADDR --calls N [--interval-ms M] [--keepalive-ms K] [--hold-ms H]
//	                   [--cancel-after-ms C] [--deadline-ms D] [--conn-per-call] [--size BYTES] [--tls]
//
// Without TLS flags both sides speak cleartext h2c. With --tls-cert and
// --tls-key (PEM files, both required) the server serves TLS; --tls makes the
// client dial TLS without verifying the server certificate (self-signed test
// certificates are fine).
//
// One unary method, /h2trace.Echo/Echo, echoes its request bytes. Messages are
// raw bytes: the codec below replaces the "proto" codec for this binary, so the
// wire content-type stays the plain "application/grpc".
// Both modes stop by themselves within 120 s.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
)

const (
	method   = "/h2trace.Echo/Echo"
	lifetime = 120 * time.Second // hard bound on either mode
	maxCalls = 10000
)

// rawCodec passes *[]byte messages through unchanged.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }
func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	if b, ok := v.(*[]byte); ok {
		return *b, nil
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	if b, ok := v.(*[]byte); ok {
		*b = append((*b)[:0], data...)
		return nil
	}
	return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
}

func init() { encoding.RegisterCodec(rawCodec{}) }

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func main() {
	if len(os.Args) < 3 || (os.Args[1] != "server" && os.Args[1] != "client") {
		fmt.Fprintln(os.Stderr, "usage: grpcgo server|client ADDR [flags]")
		os.Exit(2)
	}
	// Whatever happens, never outlive the bound.
	time.AfterFunc(lifetime, func() {
		fmt.Fprintln(os.Stderr, "grpcgo: lifetime reached, exiting")
		os.Exit(0)
	})
	mode, addr := os.Args[1], os.Args[2]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	if mode == "server" {
		maxAge := fs.Int("max-age-ms", 0, "MaxConnectionAge in ms (grace 200 ms); 0 = none")
		maxIdle := fs.Int("max-idle-ms", 0, "MaxConnectionIdle in ms; 0 = none")
		minPing := fs.Int("min-ping-interval-ms", 0, "EnforcementPolicy.MinTime in ms; 0 = default policy")
		delay := fs.Int("delay-ms", 0, "handler delay before echoing")
		deaf := fs.Bool("ignore-deadline", false, "the handler waits out its delay even past the call's deadline")
		certFile := fs.String("tls-cert", "", "PEM certificate file; with --tls-key, serve TLS")
		keyFile := fs.String("tls-key", "", "PEM private key file; with --tls-cert, serve TLS")
		fs.Parse(os.Args[3:])
		if (*certFile == "") != (*keyFile == "") {
			fmt.Fprintln(os.Stderr, "--tls-cert and --tls-key must be given together")
			os.Exit(2)
		}
		os.Exit(server(addr, *maxAge, *maxIdle, *minPing, *delay, *deaf, *certFile, *keyFile))
	}
	calls := fs.Int("calls", 1, "number of unary calls")
	interval := fs.Int("interval-ms", 0, "pause between calls")
	ka := fs.Int("keepalive-ms", 0, "client keepalive Time in ms (grpc-go raises it to >= 10000)")
	hold := fs.Int("hold-ms", 0, "keep the connection open this long after the last call")
	cancelAfter := fs.Int("cancel-after-ms", 0, "cancel each call's context after this many ms")
	deadline := fs.Int("deadline-ms", 0, "give each call this deadline")
	perCall := fs.Bool("conn-per-call", false, "dial a new connection for every call")
	size := fs.Int("size", 0, "request payload size in bytes (0 = a short text)")
	useTLS := fs.Bool("tls", false, "dial with TLS (server certificate not verified)")
	fs.Parse(os.Args[3:])
	if *calls < 0 || *calls > maxCalls {
		fmt.Fprintf(os.Stderr, "--calls must be in 0..%d\n", maxCalls)
		os.Exit(2)
	}
	if *size < 0 || *size > 4<<20-64 { // grpc-go's default 4 MiB receive limit
		fmt.Fprintln(os.Stderr, "--size must be in 0..4194240")
		os.Exit(2)
	}
	os.Exit(client(addr, *calls, *interval, *ka, *hold, *cancelAfter, *deadline, *size, *perCall, *useTLS))
}

func server(addr string, maxAge, maxIdle, minPing, delay int, deaf bool, certFile, keyFile string) int {
	var opts []grpc.ServerOption
	if certFile != "" {
		creds, err := credentials.NewServerTLSFromFile(certFile, keyFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "tls:", err)
			return 1
		}
		opts = append(opts, grpc.Creds(creds))
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		return 1
	}
	var params keepalive.ServerParameters
	if maxAge > 0 {
		// grpc-go adds +-10% jitter to MaxConnectionAge.
		params.MaxConnectionAge = ms(maxAge)
		params.MaxConnectionAgeGrace = 200 * time.Millisecond
	}
	if maxIdle > 0 {
		// An idle connection gets GOAWAY(NO_ERROR) after this long without streams.
		params.MaxConnectionIdle = ms(maxIdle)
	}
	if maxAge > 0 || maxIdle > 0 {
		opts = append(opts, grpc.KeepaliveParams(params))
	}
	if minPing > 0 {
		opts = append(opts, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime: ms(minPing), PermitWithoutStream: true}))
	}
	s := grpc.NewServer(opts...)
	echo := func(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
		var in []byte
		if err := dec(&in); err != nil {
			return nil, err
		}
		done := ctx.Done()
		if deaf {
			// Answer nothing before the delay, so the client's deadline always fires first.
			done = nil
		}
		select {
		case <-time.After(ms(delay)):
		case <-done:
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return &in, nil
	}
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "h2trace.Echo",
		HandlerType: (*interface{})(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Echo", Handler: echo}},
	}, struct{}{})
	fmt.Println("ready")
	if err := s.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		return 1
	}
	return 0
}

func client(addr string, calls, interval, ka, hold, cancelAfter, deadline, size int, perCall, useTLS bool) int {
	security := grpc.WithInsecure()
	if useTLS {
		security = grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true}))
	}
	opts := []grpc.DialOption{security, grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}))}
	if ka > 0 {
		if ms(ka) < 10*time.Second {
			fmt.Fprintf(os.Stderr, "note: grpc-go raises keepalive Time %v to its 10s minimum\n", ms(ka))
		}
		opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: ms(ka), Timeout: time.Second, PermitWithoutStream: true}))
	}
	dial := func() (*grpc.ClientConn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return grpc.DialContext(ctx, addr, opts...)
	}
	var conn *grpc.ClientConn
	var err error
	if !perCall {
		if conn, err = dial(); err != nil {
			fmt.Fprintln(os.Stderr, "dial:", err)
			return 1
		}
		defer conn.Close()
	}
	ok, canceled, unavailable, failed := 0, 0, 0, 0
	for i := 0; i < calls; i++ {
		if i > 0 && interval > 0 {
			time.Sleep(ms(interval))
		}
		c := conn
		if perCall {
			if c, err = dial(); err != nil {
				fmt.Fprintln(os.Stderr, "dial:", err)
				return 1
			}
		}
		ctx, cancel := context.WithCancel(context.Background())
		if deadline > 0 {
			ctx, cancel = context.WithTimeout(context.Background(), ms(deadline))
		}
		if cancelAfter > 0 {
			time.AfterFunc(ms(cancelAfter), cancel)
		}
		req := []byte(fmt.Sprintf("ping %d", i))
		if size > 0 {
			req = append(req, bytes.Repeat([]byte{'x'}, size)...)[:size]
		}
		var resp []byte
		err := c.Invoke(ctx, method, &req, &resp)
		cancel()
		if perCall {
			c.Close()
		}
		switch code := status.Code(err); {
		case err == nil && string(resp) == string(req):
			ok++
		case err == nil:
			failed++
			fmt.Fprintf(os.Stderr, "call %d: bad echo %q\n", i, resp)
		case code == codes.Canceled || code == codes.DeadlineExceeded || errors.Is(err, context.Canceled):
			canceled++
			fmt.Fprintf(os.Stderr, "call %d: expected: %v\n", i, err)
		case code == codes.Unavailable: // e.g. GOAWAY / connection closed
			unavailable++
			fmt.Fprintf(os.Stderr, "call %d: expected: %v\n", i, err)
		default:
			failed++
			fmt.Fprintf(os.Stderr, "call %d: error: %v\n", i, err)
		}
	}
	if hold > 0 {
		time.Sleep(ms(hold))
	}
	fmt.Printf("ok=%d canceled=%d unavailable=%d failed=%d\n", ok, canceled, unavailable, failed)
	if failed > 0 {
		return 1
	}
	return 0
}

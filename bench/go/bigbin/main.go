// bigbin is a Go binary of about 20 MB (net/http, TLS, go/types, templates, images, SQL, ...):
// the size of a real service, for measuring how long the agent takes to attach to one.
// It starts a few goroutines and exits.
package main

import (
	"archive/tar"
	"compress/bzip2"
	"compress/lzw"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"debug/gosym"
	"debug/macho"
	"debug/pe"
	"encoding/asn1"
	"encoding/csv"
	"encoding/gob"
	"encoding/pem"
	"expvar"
	"go/build"
	"go/doc"
	"go/format"
	"go/printer"
	"index/suffixarray"
	"log/slog"
	"mime/multipart"
	"net/http/cookiejar"
	"net/http/httputil"
	_ "net/http/pprof"
	"os/exec"
	"runtime/pprof"
	"testing"
	"text/tabwriter"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"debug/dwarf"
	"debug/elf"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"go/ast"
	"go/importer"
	"go/parser"
	"go/token"
	"go/types"
	htmltemplate "html/template"
	"image"
	"image/gif"
	"image/jpeg"
	"image/png"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"net/rpc"
	"net/smtp"
	"os"
	"regexp"
	"sync"
	texttemplate "text/template"
)

var keep = []any{
	zip.NewReader, gzip.NewReader, tls.Dial, x509.ParseCertificate, sql.Open, dwarf.New, elf.Open,
	json.Marshal, xml.Marshal, ast.Print, importer.Default, parser.ParseFile, token.NewFileSet,
	htmltemplate.New, texttemplate.New, image.NewRGBA, gif.Decode, jpeg.Decode, png.Decode,
	big.NewInt, http.ListenAndServe, httptest.NewServer, mail.ParseAddress, rpc.Dial, smtp.Dial,
	regexp.MustCompile, tar.NewReader, bzip2.NewReader, lzw.NewReader, ecdsa.GenerateKey, ed25519.GenerateKey,
	rsa.GenerateKey, gosym.NewTable, macho.Open, pe.Open, asn1.Marshal, csv.NewReader, gob.NewEncoder, pem.Decode,
	expvar.NewInt, build.Import, doc.New, format.Source, printer.Fprint, suffixarray.New, slog.New, multipart.NewReader,
	cookiejar.New, httputil.DumpRequest, exec.Command, pprof.StartCPUProfile, testing.Benchmark, tabwriter.NewWriter, (&types.Config{}).Check, os.Getpid,
}

func main() {
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var buf bytes.Buffer
			fmt.Fprintf(&buf, "%d %d %d", i, len(keep), generated[i](nil, nil))
		}(i)
	}
	wg.Wait()
	if len(os.Args) > 1 {
		fmt.Println(len(keep))
	}
}

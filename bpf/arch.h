// Where Go's register ABI (ABIInternal) puts what the probes read, for the target architecture.
// bcc's helpers.h defines bpf_target_<arch> from its ARCH variable (-D__TARGET_ARCH_<arch>) or else
// from the compiling machine; a plain `clang -target bpf` build passes -D__TARGET_ARCH_<arch>.
// otel_goroutines/goruntime.py (ARCHES) holds the same facts for user space, and chooses the
// probe addresses where these registers still hold the arguments.
#ifndef OTEL_GOROUTINES_ARCH_H
#define OTEL_GOROUTINES_ARCH_H

#if defined(bpf_target_x86) || defined(__TARGET_ARCH_x86)
// Integer arguments and results in RAX, RBX, RCX, RDI, RSI, R8, ...; the current g in R14.
#define GO_ARG1(ctx) ((ctx)->ax)
#define GO_ARG2(ctx) ((ctx)->bx)
#define GO_ARG3(ctx) ((ctx)->cx)
#define GO_ARG4(ctx) ((ctx)->di)
#define GO_ARG5(ctx) ((ctx)->si)
#define GO_ARG6(ctx) ((ctx)->r8)
#define GO_G(ctx) ((ctx)->r14)
#define GO_IP(ctx) ((ctx)->ip)
// At a function's entry (where the casgstatus probe sits): where its caller resumes, on the stack.
#define GO_RETURN_ADDR(ctx, cfg) read_u64(cfg, (ctx)->sp)
#elif defined(bpf_target_arm64) || defined(__TARGET_ARCH_arm64)
// Integer arguments and results in R0-R15; the current g in R28. The kernel's struct pt_regs
// starts with struct user_pt_regs { u64 regs[31]; u64 sp; u64 pc; u64 pstate; }.
#define GO_ARG1(ctx) ((ctx)->regs[0])
#define GO_ARG2(ctx) ((ctx)->regs[1])
#define GO_ARG3(ctx) ((ctx)->regs[2])
#define GO_ARG4(ctx) ((ctx)->regs[3])
#define GO_ARG5(ctx) ((ctx)->regs[4])
#define GO_ARG6(ctx) ((ctx)->regs[5])
#define GO_G(ctx) ((ctx)->regs[28])
#define GO_IP(ctx) ((ctx)->pc)
// Before the function calls anything: where its caller resumes, in the link register.
#define GO_RETURN_ADDR(ctx, cfg) ((ctx)->regs[30])
#else
#error "Go probes are written for amd64 (__TARGET_ARCH_x86) and arm64 (__TARGET_ARCH_arm64) only"
#endif

#endif

/* A stand-in for NCCL and the CUDA runtime, for tests on machines without GPUs: the same C entry
 * points betadpo's distributed::nccl calls, working on host memory, the sums done by MPI (the
 * process's own MPI, which betadpo initialised). It checks what real NCCL requires of its caller
 * (one id from rank 0 on every rank, a consistent rank and size, float32 sums, grouped calls
 * balanced) and, with BETADPO_STAND_IN_LOG set, appends one line per group to that file:
 * "rank R group N ELEMENTS", so a test can count the collective calls of a step.
 * Failures on rank R: BETADPO_STAND_IN_HANG_RANK=R, its stream never finishes (a hung rank);
 * BETADPO_STAND_IN_ASYNC_ERROR_RANK=R, its allreduce reports ncclRemoteError asynchronously (a peer
 * died); BETADPO_STAND_IN_BLOCK_INIT_RANK=R, ncclCommInitRank never returns. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <unistd.h>

typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { void *buf; size_t count; } op_t;
typedef struct { int rank, nranks; } comm_t;

static int env_rank(const char *name) {
    const char *v = getenv(name);
    int me;
    if (!v) return 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    return atoi(v) == me;
}

static int group_depth = 0, n_ops = 0, cap_ops = 0, device = -1, queries = 0;
static op_t *ops = NULL;

int ncclGetVersion(int *v) { *v = 21900; return 0; }

const char *ncclGetErrorString(int code) {
    switch (code) {
    case 0: return "no error";
    case 4: return "invalid argument (stand-in)";
    case 5: return "invalid usage (stand-in)";
    case 6: return "remote process exited or there was a network error (stand-in)";
    default: return "stand-in error";
    }
}

int ncclGetUniqueId(ncclUniqueId *id) {
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "stand-in id of pid %d", (int)getpid());
    return 0;
}

int ncclCommInitRank(comm_t **comm, int nranks, ncclUniqueId id, int rank) {
    int size, me;
    ncclUniqueId root = id;
    if (env_rank("BETADPO_STAND_IN_BLOCK_INIT_RANK"))
        for (;;) pause();
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    if (size != nranks || me != rank || device < 0) return 4;
    MPI_Bcast(root.internal, 128, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (memcmp(root.internal, id.internal, 128) != 0 || strncmp(id.internal, "stand-in id", 11) != 0) return 4;
    *comm = malloc(sizeof **comm);
    (*comm)->rank = rank;
    (*comm)->nranks = nranks;
    return 0;
}

static void run_ops(void) {
    size_t total = 0;
    for (int i = 0; i < n_ops; i++) {
        MPI_Allreduce(MPI_IN_PLACE, ops[i].buf, (int)ops[i].count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        total += ops[i].count;
    }
    const char *log = getenv("BETADPO_STAND_IN_LOG");
    if (log) {
        int me;
        MPI_Comm_rank(MPI_COMM_WORLD, &me);
        FILE *f = fopen(log, "a");
        if (f) { fprintf(f, "rank %d group %d %zu\n", me, n_ops, total); fclose(f); }
    }
    n_ops = 0;
    queries = 0;
}

int ncclAllReduce(const void *send, void *recv, size_t count, int dtype, int op, comm_t *comm, void *stream) {
    if (dtype != 7 || op != 0 || send != recv || comm == NULL || stream == NULL || count > INT_MAX) return 4;
    if (n_ops == cap_ops) {
        cap_ops = cap_ops ? 2 * cap_ops : 64;
        ops = realloc(ops, cap_ops * sizeof *ops);
    }
    ops[n_ops].buf = recv;
    ops[n_ops].count = count;
    n_ops++;
    if (group_depth == 0) run_ops();
    return 0;
}

int ncclGroupStart(void) { group_depth++; return 0; }
int ncclGroupEnd(void) {
    if (group_depth == 0) return 5;
    if (--group_depth == 0) run_ops();
    return 0;
}
int ncclCommGetAsyncError(comm_t *comm, int *err) {
    *err = env_rank("BETADPO_STAND_IN_ASYNC_ERROR_RANK") ? 6 : 0;
    return comm ? 0 : 4;
}
int ncclCommAbort(comm_t *comm) { free(comm); return 0; }
int ncclCommDestroy(comm_t *comm) { free(comm); return 0; }

int cudaSetDevice(int d) { device = d; return 0; }
int cudaStreamCreateWithFlags(void **stream, unsigned flags) { *stream = (void *)&device; return flags == 1 ? 0 : 1; }
int cudaStreamQuery(void *stream) {
    if (env_rank("BETADPO_STAND_IN_HANG_RANK") || env_rank("BETADPO_STAND_IN_ASYNC_ERROR_RANK")) return 600;
    /* "not ready" twice after each group: the caller must poll */
    return queries++ < 2 ? 600 : 0;
}
int cudaStreamDestroy(void *stream) { return 0; }
const char *cudaGetErrorString(int code) { return code == 600 ? "device not ready" : "stand-in CUDA error"; }

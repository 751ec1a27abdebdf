#include "direct_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace moe {

namespace {

struct IoResult {
  size_t nread;  // bytes the kernel returned
  int err;       // errno of the failing pread, 0 if it stopped at end of file or finished
};

// pread until `len` bytes, end of file or an error. With O_DIRECT a read that ends mid-block
// only happens at end of file, and the next (unaligned) pread would fail, so stop there.
IoResult pread_full(int fd, char* buf, size_t len, uint64_t offset, bool direct) {
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread(fd, buf + done, len - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return {done, errno};
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
    if (direct && done % kIoAlignment != 0) break;
  }
  return {done, 0};
}

std::string file_size_string(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return "of unknown size";
  return std::to_string(static_cast<long long>(st.st_size)) + " bytes";
}

// Same wording as the torch fallback in moe_engine/_ops.py.
std::string short_read_message(const std::string& path, uint64_t offset, size_t expected, size_t got, int fd) {
  return "short read from '" + path + "' at offset " + std::to_string(offset) + ": expected " +
         std::to_string(expected) + " bytes, got " + std::to_string(got) + " (the file is " +
         file_size_string(fd) + "; was it truncated or replaced?)";
}

std::string read_error_message(const std::string& path, uint64_t offset, size_t expected, size_t got, int err) {
  return "read error on '" + path + "' at offset " + std::to_string(offset) + ": expected " +
         std::to_string(expected) + " bytes, got " + std::to_string(got) + ": " + errno_string(err);
}

std::string open_error_message(const std::string& path, uint64_t offset, size_t expected, int err) {
  return "cannot open '" + path + "' to read " + std::to_string(expected) + " bytes at offset " +
         std::to_string(offset) + ": " + errno_string(err);
}

}  // namespace

DirectReader::DirectReader(int num_threads, bool direct, size_t chunk_bytes)
    : num_threads_(num_threads), direct_(direct), chunk_bytes_(chunk_bytes) {
  MOE_CHECK(num_threads >= 1 && num_threads <= 1024, "DirectReader: num_threads must be in [1, 1024], got "
                                                         << num_threads);
  MOE_CHECK(chunk_bytes >= kIoAlignment && chunk_bytes % kIoAlignment == 0,
            "DirectReader: chunk_bytes must be a positive multiple of " << kIoAlignment << ", got " << chunk_bytes);
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

DirectReader::~DirectReader() { close(); }

std::shared_ptr<DirectReader::File> DirectReader::get_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(files_mu_);
  auto it = files_.find(path);
  if (it != files_.end()) return it->second;
  auto f = std::make_shared<File>(path);
  files_.emplace(path, f);
  return f;
}

uint64_t DirectReader::submit(const std::vector<RangeTuple>& ranges) {
  auto ticket = std::make_shared<Ticket>();
  std::vector<Task> tasks;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto& [path, offset, nbytes, dest, available] = ranges[i];
    MOE_CHECK(!path.empty(), "range " << i << ": empty path");
    MOE_CHECK(offset >= 0, "range " << i << " ('" << path << "'): file_offset must be >= 0, got " << offset);
    MOE_CHECK(nbytes >= 0, "range " << i << " ('" << path << "'): nbytes must be >= 0, got " << nbytes);
    MOE_CHECK(available >= nbytes, "range " << i << " ('" << path << "'): destination has " << available
                                            << " bytes, the range needs " << nbytes);
    if (nbytes == 0) continue;
    MOE_CHECK(dest != 0, "range " << i << " ('" << path << "'): null destination pointer");
    auto file = get_file(path);
    // Chunk boundaries sit at multiples of chunk_bytes_ in the file, so a chunk's aligned
    // superset never exceeds chunk_bytes_ and neighbouring chunks read disjoint blocks.
    uint64_t pos = static_cast<uint64_t>(offset);
    const uint64_t end = pos + static_cast<uint64_t>(nbytes);
    while (pos < end) {
      const uint64_t stop = std::min<uint64_t>(end, round_down(pos, chunk_bytes_) + chunk_bytes_);
      char* d = reinterpret_cast<char*>(dest) + (pos - static_cast<uint64_t>(offset));
      tasks.push_back(Task{ticket, file, pos, static_cast<size_t>(stop - pos), d});
      pos = stop;
    }
  }
  ticket->remaining = tasks.size();
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(tickets_mu_);
    id = next_ticket_++;
    tickets_.emplace(id, ticket);
  }
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (stopping_) {
      std::lock_guard<std::mutex> tlock(tickets_mu_);
      tickets_.erase(id);
      throw std::runtime_error("DirectReader.submit: the reader is closed");
    }
    for (auto& t : tasks) queue_.push_back(std::move(t));
  }
  queue_cv_.notify_all();
  return id;
}

std::shared_ptr<DirectReader::Ticket> DirectReader::find_ticket(uint64_t id) {
  std::lock_guard<std::mutex> lock(tickets_mu_);
  auto it = tickets_.find(id);
  if (it == tickets_.end()) {
    throw std::out_of_range("unknown ticket " + std::to_string(id) + " (never submitted or already waited)");
  }
  return it->second;
}

void DirectReader::wait(uint64_t id) {
  auto ticket = find_ticket(id);
  std::string error;
  {
    std::unique_lock<std::mutex> lock(ticket->mu);
    ticket->cv.wait(lock, [&] { return ticket->remaining == 0; });
    error = ticket->error;
  }
  {
    std::lock_guard<std::mutex> lock(tickets_mu_);
    tickets_.erase(id);
  }
  if (!error.empty()) throw ReadError(error);
}

bool DirectReader::done(uint64_t id) {
  auto ticket = find_ticket(id);
  std::lock_guard<std::mutex> lock(ticket->mu);
  return ticket->remaining == 0;
}

void DirectReader::close() {
  std::lock_guard<std::mutex> close_lock(close_mu_);
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  for (auto& w : workers_) w.join();  // workers drain the queue before they exit
  workers_.clear();
  std::lock_guard<std::mutex> lock(files_mu_);
  for (auto& [path, f] : files_) {
    std::lock_guard<std::mutex> flock(f->mu);
    if (f->direct_fd >= 0) ::close(f->direct_fd);
    if (f->buffered_fd >= 0) ::close(f->buffered_fd);
    f->direct_fd = f->buffered_fd = -1;
    f->opened = false;
  }
}

std::vector<std::string> DirectReader::buffered_paths() {
  std::lock_guard<std::mutex> lock(paths_mu_);
  return buffered_paths_;
}

void DirectReader::worker_loop() {
  // This worker's aligned staging buffer for direct reads: a whole chunk, or a partial first and last block.
  const size_t bounce_bytes = std::max(chunk_bytes_, 2 * kIoAlignment);
  void* bounce = nullptr;
  const int alloc_rc = direct_ ? posix_memalign(&bounce, kIoAlignment, bounce_bytes) : 0;
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) break;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    std::string error;
    try {
      if (alloc_rc != 0) throw ReadError("cannot allocate a " + std::to_string(bounce_bytes) +
                                         "-byte bounce buffer: " + errno_string(alloc_rc));
      run_task(task, static_cast<char*>(bounce));
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::lock_guard<std::mutex> lock(task.ticket->mu);
    if (!error.empty() && task.ticket->error.empty()) task.ticket->error = error;
    if (--task.ticket->remaining == 0) task.ticket->cv.notify_all();
  }
  std::free(bounce);
}

// Opens the file on first use: O_DIRECT when asked, a normal descriptor when O_DIRECT is refused.
// Returns -1 with *err set when the file cannot be opened (nothing is cached then: a later read retries).
int DirectReader::file_fd(File& f, bool* use_direct, int* err) {
  std::lock_guard<std::mutex> lock(f.mu);
  if (!f.opened) {
    if (direct_) {
      f.direct_fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
      if (f.direct_fd < 0 && errno != EINVAL) return *err = errno, -1;
    }
    if (f.direct_fd < 0) {
      f.buffered_fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC);
      if (f.buffered_fd < 0) return *err = errno, -1;
      if (direct_) {
        std::lock_guard<std::mutex> plock(paths_mu_);
        buffered_paths_.push_back(f.path);
      }
    }
    f.use_direct = f.direct_fd >= 0;
    f.opened = true;
  }
  *use_direct = f.use_direct;
  return f.use_direct ? f.direct_fd : f.buffered_fd;
}

// A direct read failed with EINVAL: read the file through a normal descriptor from now on.
// Returns that descriptor, or -1 with *err set.
int DirectReader::fall_back_to_buffered(File& f, int* err) {
  std::lock_guard<std::mutex> lock(f.mu);
  if (!f.use_direct) return f.buffered_fd;  // another worker already did it
  f.buffered_fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.buffered_fd < 0) return *err = errno, -1;
  f.use_direct = false;  // direct_fd stays open until close(): another worker may be reading it
  std::lock_guard<std::mutex> plock(paths_mu_);
  buffered_paths_.push_back(f.path);
  return f.buffered_fd;
}

void DirectReader::run_task(const Task& t, char* bounce) {
  bool use_direct = false;
  int err = 0;
  int fd = file_fd(*t.file, &use_direct, &err);
  if (fd >= 0 && use_direct) {
    if (read_direct(t, fd, bounce)) return;
    fd = fall_back_to_buffered(*t.file, &err);  // the filesystem refused direct IO: redo this chunk
  }
  if (fd < 0) throw ReadError(open_error_message(t.file->path, t.offset, t.nbytes, err));
  read_buffered(t, fd);
}

// Reads the chunk's 4096-aligned blocks with O_DIRECT and puts the wanted bytes in dest.
// Zero copy: when dest and the file offset have the same address modulo 4096, the whole blocks go
// straight into dest and only the partial first/last block pass through the bounce buffer
// (bounce[0, A) and bounce[A, 2A)); otherwise the aligned superset is read into bounce and copied.
// Returns false (nothing delivered) when the filesystem refuses direct IO with EINVAL.
bool DirectReader::read_direct(const Task& t, int fd, char* bounce) {
  constexpr size_t A = kIoAlignment;
  const uint64_t end = t.offset + t.nbytes;
  const uint64_t mid_start = round_up(t.offset, A), mid_stop = round_down(end, A);
  char* const mid_dest = t.dest + (mid_start - t.offset);
  const bool zero_copy = mid_stop > mid_start && reinterpret_cast<uintptr_t>(mid_dest) % A == 0;
  struct Piece {
    uint64_t at;  // file offset, multiple of A
    size_t len;   // multiple of A
    char* buf;    // A-aligned
  };
  Piece pieces[3];
  int count = 0;
  if (zero_copy) {
    if (t.offset < mid_start) pieces[count++] = {mid_start - A, A, bounce};
    pieces[count++] = {mid_start, static_cast<size_t>(mid_stop - mid_start), mid_dest};
    if (end > mid_stop) pieces[count++] = {mid_stop, A, bounce + A};
  } else {
    const uint64_t start = round_down(t.offset, A);
    pieces[count++] = {start, static_cast<size_t>(round_up(end, A) - start), bounce};
  }
  size_t nread = 0;  // bytes read contiguously from pieces[0].at
  IoResult r{0, 0};
  for (int i = 0; i < count; ++i) {
    r = pread_full(fd, pieces[i].buf, pieces[i].len, pieces[i].at, true);
    bytes_disk_read_ += r.nread;
    nread += r.nread;
    if (i == 0 && r.err == EINVAL && r.nread == 0) return false;
    if (r.err != 0 || r.nread < pieces[i].len) break;
  }
  const size_t lead = static_cast<size_t>(t.offset - pieces[0].at);
  const size_t got = nread > lead ? std::min(nread - lead, t.nbytes) : 0;
  if (r.err != 0) throw ReadError(read_error_message(t.file->path, t.offset, t.nbytes, got, r.err));
  if (got < t.nbytes) throw ReadError(short_read_message(t.file->path, t.offset, t.nbytes, got, fd));
  if (!zero_copy) {
    std::memcpy(t.dest, bounce + lead, t.nbytes);
  } else {
    if (t.offset < mid_start) std::memcpy(t.dest, bounce + lead, static_cast<size_t>(mid_start - t.offset));
    if (end > mid_stop) std::memcpy(mid_dest + (mid_stop - mid_start), bounce + A, static_cast<size_t>(end - mid_stop));
  }
  bytes_delivered_ += t.nbytes;
  return true;
}

// Reads the chunk straight into dest through the page cache.
void DirectReader::read_buffered(const Task& t, int fd) {
  IoResult r = pread_full(fd, t.dest, t.nbytes, t.offset, false);
  bytes_disk_read_ += r.nread;
  if (r.err != 0) throw ReadError(read_error_message(t.file->path, t.offset, t.nbytes, r.nread, r.err));
  if (r.nread < t.nbytes) throw ReadError(short_read_message(t.file->path, t.offset, t.nbytes, r.nread, fd));
  bytes_delivered_ += t.nbytes;
}

}  // namespace moe
